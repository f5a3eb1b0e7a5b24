"""slimfx."""
