"""benchmarks/mla_decode.py: the CPU smoke test runs every method and checks it against its
reference (tiny shapes under the Triton interpreter)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _helpers import load_benchmark

from . import DEVICE, triton_skip_reason


def _load():  # noqa: ANN202
    return load_benchmark("mla_decode")


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
