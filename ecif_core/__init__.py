"""ECIF: influence functions for contrastive (CLIP-style) losses, to find misaligned pairs."""
__version__ = "0.1.0"
