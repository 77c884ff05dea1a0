"""cxr-jax: pix2pix data enhancement for COVID-19 chest X-ray classification, in JAX/Flax NNX."""

__version__ = "0.1.0"
