"""slimfx.cost."""
