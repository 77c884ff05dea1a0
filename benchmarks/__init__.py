"""Benchmarks of cxr-jax, beside the package (as Flax keeps its example benchmarks): run
`python -m benchmarks.bench` from the repository root."""
