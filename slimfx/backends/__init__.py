"""slimfx.backends."""
