"""Pallas attention kernels and their references. Depends only on jax."""
