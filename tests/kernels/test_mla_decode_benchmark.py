"""benchmarks/mla_decode.py: the CPU smoke test runs every method and checks it against its
reference (tiny shapes under the Triton interpreter)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from . import DEVICE, triton_skip_reason

_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "mla_decode.py"


def _load():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("slimfx_bench_mla_decode", _SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(bool(triton_skip_reason()) or DEVICE.type != "cpu",
                    reason=triton_skip_reason() or "the smoke test is the CPU path")
def test_tiny_cpu_smoke(tmp_path: Path) -> None:
    out = tmp_path / "mla.json"
    assert _load().main(["--device", "cpu", "--tiny", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["method"] for r in rows} == {"sdpa gqa", "mla bf16", "mla int8", "kv int4"}
    assert all(r["ok"] for r in rows)
    # the latent and the int4 caches read fewer bytes than the GQA cache at every size
    for r in rows:
        if r["method"] != "sdpa gqa":
            base = next(b for b in rows if b["method"] == "sdpa gqa"
                        and (b["batch"], b["context"]) == (r["batch"], r["context"]))
            assert r["bytes"] < base["bytes"]
