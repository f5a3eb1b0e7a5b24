"""kv_attention: Triton decode attention over the quantized cache vs the torch reference (and
the reference vs plain attention over the cache's dequantized tensors)."""

from __future__ import annotations

import pytest
import torch

from . import DEVICE, kernels_interpreted_or_cuda, triton_skip_reason

_why = triton_skip_reason()
if _why:
    pytest.skip(_why, allow_module_level=True)

from slimfx.forms.kv.cache import QuantizedKVLayer  # noqa: E402
from slimfx.forms.kv.config import KVQuantConfig  # noqa: E402
from slimfx.kernels.kv_attention import kv_decode_attention_triton  # noqa: E402
from slimfx.kernels.kv_attention import triton_kernel as tk  # noqa: E402
from slimfx.kernels.kv_attention.reference import kv_decode_attention_reference  # noqa: E402

_why = kernels_interpreted_or_cuda(tk._kv_decode_split_kernel)
if _why:
    pytest.skip(_why, allow_module_level=True)

pytestmark = pytest.mark.usefixtures("one_thread")


def _cache(cfg, B, Hq, Hkv, D, n, dtype, seed=0):
    """A real QuantizedKVLayer fed ``n`` tokens one at a time, and the query of the next step
    with that step's own key/value (the window's last token)."""
    g = torch.Generator().manual_seed(seed)
    layer = QuantizedKVLayer(cfg)
    scale = torch.linspace(0.5, 3.0, D)  # channel-dependent key magnitudes, as in real models
    for _ in range(n - 1):
        k = (torch.randn(B, Hkv, 1, D, generator=g) * scale).to(dtype)
        layer.update(k, torch.randn(B, Hkv, 1, D, generator=g).to(dtype))
    k = (torch.randn(B, Hkv, 1, D, generator=g) * scale).to(dtype)
    v = torch.randn(B, Hkv, 1, D, generator=g).to(dtype)
    keys, values = layer.update(k, v)  # what HF attention would read this step
    q = torch.randn(B, Hq, D, generator=g).to(dtype)
    return layer, q, keys, values


def _args(layer, cfg, q):
    s = layer.store
    if s is None:  # nothing quantized yet: an empty store
        B, H, _, D = layer.keys.shape
        e8 = torch.empty(B, H, 0, D, dtype=torch.uint8)
        e16 = torch.empty(B, H, 0, D, dtype=torch.float16)
        s = {
            "k_codes": e8[..., : D * cfg.key_bits // 8],
            "k_scale": e16,
            "k_min": e16,
            "v_codes": e8[..., : D * cfg.value_bits // 8],
            "v_scale": e16[..., : D // cfg.value_group],
            "v_min": e16[..., : D // cfg.value_group],
        }
    names = ("k_codes", "k_scale", "k_min", "v_codes", "v_scale", "v_min")
    t = [s[n].to(DEVICE) for n in names]
    return (
        q.to(DEVICE),
        *t,
        layer.keys.to(DEVICE),
        layer.values.to(DEVICE),
        cfg.key_bits,
        cfg.value_bits,
        cfg.key_group,
        cfg.value_group,
        q.shape[-1] ** -0.5,
    )


@pytest.mark.parametrize(
    "cfg, n",
    [
        (KVQuantConfig(4, 4, 8, 16, 0), 37),  # odd length, partial block in the window
        (KVQuantConfig(4, 4, 8, 16, 5), 13),  # window boundary: 8 quantized, 5 exact
        (KVQuantConfig(4, 4, 8, 16, 5), 12),  # one token short of the next flush
        (KVQuantConfig(2, 8, 16, 8, 0), 70),  # several splits at 4 "SMs"
        (KVQuantConfig(8, 2, 4, 32, 3), 6),
        (KVQuantConfig(4, 4, 32, 16, 0), 9),  # nothing quantized yet
        (KVQuantConfig(4, 4, 8, 16, 3, sink=2), 30),  # sink tokens ride in the window
    ],
)
@pytest.mark.parametrize("heads", [(2, 1), (4, 2), (3, 3)])
def test_kernel_matches_reference_and_the_cache(cfg, n, heads):
    Hq, Hkv = heads
    D = 32
    layer, q, keys, values = _cache(cfg, 2, Hq, Hkv, D, n, torch.float32)
    args = _args(layer, cfg, q)
    ref = kv_decode_attention_reference(*args)
    got = tk.kv_decode_attention(*args)
    torch.testing.assert_close(got.cpu(), ref.cpu(), atol=1e-5, rtol=1e-5)
    # the reference equals plain attention over what the cache layer returns
    rep = Hq // Hkv
    k = keys.repeat_interleave(rep, 1)
    v = values.repeat_interleave(rep, 1)
    p = torch.softmax(torch.einsum("bhd,bhnd->bhn", q, k) * D**-0.5, -1)
    torch.testing.assert_close(ref.cpu(), torch.einsum("bhn,bhnd->bhd", p, v), atol=1e-5, rtol=1e-5)


def test_half_precision_and_the_custom_op():
    cfg = KVQuantConfig(4, 4, 8, 16, 2)
    layer, q, *_ = _cache(cfg, 1, 4, 2, 32, 29, torch.float16, seed=3)
    args = _args(layer, cfg, q)
    ref = kv_decode_attention_reference(*args)
    got = kv_decode_attention_triton(*args)
    assert got.dtype == torch.float16
    # both accumulate in fp32 and round once to fp16: within two fp16 ulps of the largest output
    assert (got.float() - ref.float()).abs().max() <= 2 * 2**-10 * ref.float().abs().max()
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        out = torch.ops.slimfx_kernels.kv_decode_attention_triton(*fake)
    assert out.shape == q.shape and out.dtype == q.dtype


def test_the_kv_quant_form_names_this_kernel_and_select_runs_it():
    """``kernels.select("kv_attention", q, **args)`` (the lookup every backend uses) finds the
    kernel through the ``kv_quant`` form and runs it; a bad call is declined with the reason."""
    from slimfx.kernels import select

    cfg = KVQuantConfig(4, 4, 8, 16, 2)
    layer, q, *_ = _cache(cfg, 1, 4, 2, 32, 21, torch.float32, seed=1)
    args = _args(layer, cfg, q)
    names = (
        "k_codes", "k_scale", "k_min", "v_codes", "v_scale", "v_min", "k_win", "v_win",
        "key_bits", "value_bits", "key_group", "value_group", "scaling",
    )
    kw = dict(zip(names, args[1:], strict=True))
    kernel, declined = select("kv_attention", args[0], **kw)
    assert kernel is not None and not declined and kernel.name == "kv_attention_triton_split"
    ref = kv_decode_attention_reference(*args)
    torch.testing.assert_close(kernel.run(args[0], **kw).cpu(), ref.cpu(), atol=1e-5, rtol=1e-5)
    kernel, declined = select("kv_attention", args[0], **{**kw, "value_group": 12})
    assert kernel is None and "not divisible by the value group 12" in declined[0]


def test_splits_and_refusals():
    assert tk.pick_splits(1, 1, 0, torch.device("cpu")) == 1
    assert tk.pick_splits(1, 1, 10 * tk.BLOCK_N, torch.device("cpu")) == 8  # 2 × 4 "SMs"
    assert tk.pick_splits(1, 1, 3 * tk.BLOCK_N, torch.device("cpu")) == 3  # never an empty one
    cfg = KVQuantConfig(4, 4, 8, 16, 0)
    layer, q, *_ = _cache(cfg, 1, 2, 1, 32, 20, torch.float32)
    args = list(_args(layer, cfg, q))
    args[12] = 12  # value group
    with pytest.raises(ValueError, match="head_dim 32 is not divisible by the value group 12"):
        tk.kv_decode_attention(*args)


def test_benchmark_cli_smoke(tmp_path):
    import json

    from _helpers import load_benchmark

    bench = load_benchmark("kv_attention")
    out = tmp_path / "kv.json"
    args = ["--device", "cpu", "--tiny", "--batches", "1", "--json", str(out)]
    assert bench.main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["context"] for r in rows] == [80, 161]
    # int4 codes + fp16 scales/minimums + a bf16 window: well under the bf16 cache
    assert all(
        r["bytes_quant"] < 0.5 * r["bytes_bf16"] and r["rel_err_kernel"] < 2e-2 for r in rows
    )


@pytest.mark.parametrize("kernel", [True, False])
def test_layer_decode_attention_equals_attention_over_what_update_returned(kernel):
    cfg = KVQuantConfig(4, 2, 8, 16, 3, sink=2)
    for n in (5, 31):  # nothing stored yet / store + window + sinks
        layer, q, keys, values = _cache(cfg, 2, 4, 2, 32, n, torch.float32, seed=n)
        got = layer.decode_attention(q.unsqueeze(2), 32**-0.5, kernel=kernel)
        k, v = keys.repeat_interleave(2, 1), values.repeat_interleave(2, 1)
        p = torch.softmax(torch.einsum("bhd,bhnd->bhn", q, k) * 32**-0.5, -1)
        want = torch.einsum("bhn,bhnd->bhd", p, v)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
