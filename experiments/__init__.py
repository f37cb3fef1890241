"""Reproducible experiments on attnjax (``python -m experiments <name>``)."""
