"""Flax NNX networks: the pix2pix generator and discriminator, the ResNet-50 classifier, its
ImageNet weight import (from local files only) and the builders both training and loading use.
Import the modules themselves (`from cxr_jax.models import build`)."""
