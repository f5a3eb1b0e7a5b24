"""ONNX Runtime decode steps of a model with sliding-window layers: the step graph whose window
layers keep their last ``window - 1`` tokens (``export_onnx(kv_cache=True)`` now) vs the same
model's graph holding every token with the window applied by the mask (the export before:
``onnx_decode.model_windows`` patched to report no window layer) — exported from one model,
run side by side in one process (alternating calls, median of the timed steps).

A SmolLM2-shaped Qwen2 (hidden 576, 9 heads / 3 kv heads × 64, MLP 1536) with random weights
(a speed and memory benchmark: only shapes matter) and ``--layers`` layers, Gemma-3-like: every
``--global-every``-th layer full attention, the others a sliding window of ``--window`` tokens.
The prompt is prefilled in calls of 512 tokens, then ``--steps`` one-token calls are timed
(the first two dropped). Printed per context: the cache bytes each graph holds between steps
(the arrays ONNX Runtime returns), the step times, and the largest logit difference between
the two graphs (the same function).

    OMP_NUM_THREADS=1 python benchmarks/ort_sliding.py --contexts 2048 8192 16384
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import dump, run_meta  # noqa: E402


def _model(layers: int, window: int, global_every: int):  # noqa: ANN202
    import torch
    import transformers as tf

    types = ["full_attention" if (i + 1) % global_every == 0 else "sliding_attention"
             for i in range(layers)]  # fmt: skip
    cfg = tf.Qwen2Config(hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=2048, num_hidden_layers=layers,
                         max_position_embeddings=40000, use_sliding_window=True,
                         sliding_window=window, layer_types=types)  # fmt: skip
    torch.manual_seed(0)
    return tf.Qwen2ForCausalLM(cfg).eval()


def _export(folder: Path, model) -> dict[str, Path]:  # noqa: ANN001
    """The window graph and the every-token graph of ``model``."""
    import torch

    from slimfx.backends import onnx_decode
    from slimfx.backends.onnx import export_onnx

    ids = torch.randint(0, 2048, (1, 8))
    paths = {"window": folder / "window.onnx", "every_token": folder / "every_token.onnx"}
    t = time.perf_counter()
    export_onnx(model, paths["window"], (ids,), kv_cache=True)
    print(f"exported the window graph in {time.perf_counter() - t:.0f} s", flush=True)
    real = onnx_decode.model_windows
    onnx_decode.model_windows = lambda m: {}  # the export before: every layer full
    try:
        export_onnx(model, paths["every_token"], (ids,), kv_cache=True)
    finally:
        onnx_decode.model_windows = real
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192, 16384])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--global-every", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--work", default="", help="folder for the exports (default: a temp dir)")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    import numpy as np
    import torch

    from slimfx.backends.ort import ort_session

    folder = Path(a.work or tempfile.mkdtemp(prefix="ort_sliding_"))
    folder.mkdir(parents=True, exist_ok=True)
    model = _model(a.layers, a.window, a.global_every)
    sessions = {k: ort_session(p, threads=1) for k, p in _export(folder, model).items()}
    assert sessions["window"].windows and not sessions["every_token"].windows
    rows = []
    print("| context | every-token cache MB | window cache MB | window / every-token | "
          "every-token ms/step | window ms/step | window / every-token | max logit diff |")
    for C in a.contexts:
        ids = torch.randint(0, 2048, (1, C), generator=torch.Generator().manual_seed(C))
        past: dict[str, list] = {k: None for k in sessions}  # type: ignore[misc]
        last: dict[str, np.ndarray] = {}
        for k, s in sessions.items():
            n = 0
            for c in ids.split(512, 1):
                n += c.shape[1]
                last[k], past[k] = s.step(c, past[k], attention_mask=np.ones((1, n), np.int64))
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for step in range(a.steps):
            mask = np.ones((1, C + step + 1), np.int64)
            for k, s in sessions.items():  # alternating: the same machine state for each
                t = time.perf_counter()
                last[k], past[k] = s.step(np.array([[7]]), past[k], attention_mask=mask)
                times[k].append(time.perf_counter() - t)
        ms = {k: 1e3 * float(np.median(v[2:])) for k, v in times.items()}
        mb = {k: sum(x.nbytes for x in p) / 2**20 for k, p in past.items()}
        diff = float(np.abs(last["window"] - last["every_token"]).max())
        rows.append(dict(context=C, **{f"ms_{k}": v for k, v in ms.items()},
                         **{f"cache_mb_{k}": v for k, v in mb.items()}, max_logit_diff=diff))  # fmt: skip
        print(f"| {C} | {mb['every_token']:.1f} | {mb['window']:.1f} | "
              f"{mb['window'] / mb['every_token']:.2f} | {ms['every_token']:.1f} | "
              f"{ms['window']:.1f} | {ms['window'] / ms['every_token']:.2f} | {diff:.1e} |",
              flush=True)  # fmt: skip
        dump(a.json, run_meta(layers=a.layers, window=a.window, global_every=a.global_every), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
