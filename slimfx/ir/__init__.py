"""Capture, sites, the slimfx op vocabulary and the one graph-editing helper."""
