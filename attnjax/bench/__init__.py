"""``python -m attnjax.bench``: side-by-side timings and memory reports."""
