"""mmer_cl: continual learning by training-free merging and decoupling masks (MMER)."""

__version__ = "0.1.0"
