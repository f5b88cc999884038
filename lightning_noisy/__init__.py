"""lightning-noisy: learning with noisy labels as a PyTorch Lightning plugin suite."""

__version__ = "0.1.0"
