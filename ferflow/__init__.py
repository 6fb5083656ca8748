"""ferflow: a reproducible DVC + MLflow pipeline for facial-expression CNNs."""

__version__ = "0.1.0"
