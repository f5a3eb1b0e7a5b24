"""Layer-streamed optimize: a checkpoint directory optimized one decoder block at a time.

    from slimfx.stream import optimize_checkpoint
    res = optimize_checkpoint("ckpt/", 0.3, calibration=batches, out="out/")
    model = slimfx.load("out/")

See ``docs/STREAMING.md`` for what is held in memory, resume and the sensitivity it computes.
"""

from slimfx.stream.checkpoint import Checkpoint, CheckpointError
from slimfx.stream.optimize import FAIL_AFTER_BLOCK_ENV, StreamResult, optimize_checkpoint

__all__ = [
    "optimize_checkpoint",
    "StreamResult",
    "Checkpoint",
    "CheckpointError",
    "FAIL_AFTER_BLOCK_ENV",
]
