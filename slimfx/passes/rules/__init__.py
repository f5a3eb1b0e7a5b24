"""Built-in rules, one file per decision family. Importing this package registers them."""

from slimfx.passes.rules import lowrank  # noqa: F401

for _name in ("quant", "sparse", "combo"):  # the quantized / sparse families, once present
    try:
        __import__(f"slimfx.passes.rules.{_name}")
    except ModuleNotFoundError as _e:  # pragma: no cover
        if _e.name != f"slimfx.passes.rules.{_name}":
            raise
