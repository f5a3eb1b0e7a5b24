"""Built-in rules, one file per decision family. Importing this package registers them."""

from slimfx.passes.rules import lowrank  # noqa: F401

try:  # the quantized / sparse families register when present
    from slimfx.passes.rules import quant  # noqa: F401
except ImportError:  # pragma: no cover
    pass
try:
    from slimfx.passes.rules import sparse  # noqa: F401
except ImportError:  # pragma: no cover
    pass
