"""benchmarks/kernels.py: CLI works without a GPU, and every method it times computes the right
thing (built on tiny shapes, run once under the interpreter: the same launch code paths)."""

from __future__ import annotations

import pytest
import torch
from _helpers import load_benchmark

from . import DEVICE, kernels_interpreted_or_cuda, triton_skip_reason


def _load():  # noqa: ANN202
    return load_benchmark("kernels")


def test_help_and_no_gpu_message(capsys: pytest.CaptureFixture[str]) -> None:
    bench = _load()
    with pytest.raises(SystemExit) as e:
        bench.main(["--help"])
    assert e.value.code == 0
    assert "--json" in capsys.readouterr().out
    if not torch.cuda.is_available():
        assert bench.main(["--quick"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.skipif(bool(triton_skip_reason()), reason=triton_skip_reason() or "n/a")
@pytest.mark.parametrize("M", [1, 33])
def test_methods_compute_what_they_claim(M: int) -> None:
    from slimfx.kernels.quant_linear import triton_kernel as qk

    why = kernels_interpreted_or_cuda(qk._quant_gemv_kernel)
    if why:
        pytest.skip(why)
    bench = _load()
    N, K, dtype = 32, 256, torch.bfloat16
    x = torch.randn(M, K, device=DEVICE).to(dtype)
    built = []
    for method in bench.methods_for(N, K, M, dtype, DEVICE):
        try:
            run, ref = method.build(0)
        except Exception as e:  # torch's own kernels may be missing on this device
            assert method.name.startswith(("tinygemm", "torch 2:4")), (method.name, e)
            continue
        err = bench.check(run, ref, x)
        assert err <= bench.CHECK_TOL, (method.name, err)
        built.append(method.name)
    assert "slimfx int4 g128" in built
    if M == 1:
        assert {"slimfx int8 ch", "slimfx fused lowrank r=256", "slimfx tiled lowrank r=512",
                "slimfx 2:4"} <= set(built)
