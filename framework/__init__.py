"""Pre-train foundation models on your own corpus; see README.md."""

__version__ = "0.1.0"
