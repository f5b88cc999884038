"""``python -m lightning_noisy``: the same command as ``lightning-noisy``."""

from lightning_noisy.cli import main

if __name__ == "__main__":
    main()
