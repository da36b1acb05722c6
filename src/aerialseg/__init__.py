"""Semantic segmentation of ISPRS aerial imagery as a reproducible DVC + MLflow pipeline."""

__version__ = "0.1.0"
