"""dsdm: model-aware dataset selection with datamodels (Engstrom, Feldmann, Madry, ICML 2024, arXiv 2401.12926)."""

__version__ = "0.1.0"
