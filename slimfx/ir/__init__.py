"""Capture, sites, the slimfx op vocabulary and the one graph-editing helper.

Importing this package registers every form's ``slimfx::`` op (``ops.slimfx_ops``).
"""

from slimfx.ir import ops

ops.slimfx_ops()
