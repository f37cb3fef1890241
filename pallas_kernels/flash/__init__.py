"""Blockwise (flash) softmax attention kernels and their reference."""
