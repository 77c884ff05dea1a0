"""`python main.py --config=configs/<task>.py[:variant]`: the `cxr-jax` command; see cxr_jax/cli.py."""
from cxr_jax.cli import run

if __name__ == "__main__":
  run()
