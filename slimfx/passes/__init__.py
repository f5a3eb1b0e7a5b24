"""slimfx.passes."""
