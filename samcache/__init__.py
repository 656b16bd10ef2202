"""samcache: fine-tune Segment Anything's mask decoder from an HDF5 embedding cache."""

__version__ = "0.1.0"
