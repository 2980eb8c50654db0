"""repd: a representation daemon keeping a live semantic index of folders in Qdrant."""

__version__ = "0.1.0"
