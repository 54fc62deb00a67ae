"""wgan_gp.py itself under a second name, so that tests/tiny_args.DIST can hold two of its
configurations (the exact BN-free toy MLPs as "wgan_gp.py", the tiny ResNet, BN in G, here)."""
from wgan_gp import main  # noqa: F401
