"""qrun: an experiment runner for neural-network quantization research on image classification."""

__version__ = "0.1.0"
