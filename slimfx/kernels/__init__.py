"""slimfx.kernels."""
