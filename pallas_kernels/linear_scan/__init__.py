"""Linear-attention chunked-scan kernels and their token-by-token reference."""
