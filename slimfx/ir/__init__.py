"""Capture, sites, the slimfx op vocabulary and the one graph-editing helper."""

from slimfx.ir import ops  # noqa: E402,F401  (registers the slimfx:: op vocabulary)
