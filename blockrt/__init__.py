"""blockrt: export, compile and run Block Transformer language models."""

__version__ = "0.1.0"
