"""`python -m cxr_jax --config=configs/<task>.py[:variant]`: the `cxr-jax` command."""
from cxr_jax.cli import run

if __name__ == "__main__":
  run()
