"""CPU smoke tests of ``benchmarks/e2e_decode.py`` on its tiny Llama config.

The script is loaded from its file (``benchmarks/`` is not a package). What is checked: the
torch int4 swap computes x·deq(W)ᵀ for the codes it stores, and quantizes within half a step;
which linears each variant rewrites (``lm_head`` stays dense unless asked: it is tied to the
embedding); the static-cache decode loop gives HF ``generate``'s greedy tokens and a no-cache
forward's logits; the bound arithmetic; and one whole CPU run of ``main``.
"""

from __future__ import annotations

import json

import pytest
import torch
from _helpers import load_benchmark, needs_triton_kernels
from torch import nn

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def e2e():
    return load_benchmark("e2e_decode")


@pytest.fixture(scope="module")
def tiny(e2e):
    return e2e.build_model(e2e.TINY, torch.device("cpu"), torch.float32, seed=0)


def _int4_error(e2e, dtype: torch.dtype, N: int = 48, K: int = 256, G: int = 128) -> float:
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(N, K, generator=g) * 0.02).to(dtype)
    mod = e2e.TorchInt4Linear(w, None, G)
    return e2e.check_int4(mod, w)


def test_int4_swap_matches_dequantized_linear_fp32(e2e):
    # fp32 activations: the CPU int4 kernel and F.linear differ only in summation order
    # (measured ~5e-7 of max |y|); 1e-4 leaves room for other CPU kernels' blocking.
    assert _int4_error(e2e, torch.float32) < 1e-4


def test_int4_swap_matches_dequantized_linear_bf16(e2e):
    # bf16 output rounding (2^-8 relative) plus summation order: the script's own check bound.
    assert _int4_error(e2e, torch.bfloat16) < e2e.INT4_CHECK_TOL


def test_int4_quantization_within_half_a_step(e2e):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 256, generator=g)
    q, sz = e2e.quantize_int4(w, 128, torch.float32)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and sz.shape == (2, 32, 2)
    step = sz[..., 0].t().repeat_interleave(128, dim=1)
    err = (e2e.dequantize_int4(q, sz, 128) - w).abs()
    # round-to-nearest: |err| ≤ s/2, plus float32 rounding of the z + (q − 8)·s arithmetic
    assert bool((err <= step / 2 + 1e-6).all())


def test_cuda_packing_probe_picks_the_layout_the_kernel_reads(e2e, monkeypatch):
    # No GPU here: stand in for torch's CUDA pair with the CPU kernel behind a converter that
    # reads uint8 (N × K/2), even column in the high nibble, and rejects int32 codes like
    # torch ≥ 2.5. The probe must pick that layout and reject the swapped-nibble one.
    def convert(packed, inner_k_tiles):
        if packed.dtype != torch.uint8:
            raise RuntimeError("expected w to be uint8")
        codes = torch.stack([packed >> 4, packed & 15], dim=-1).reshape(packed.shape[0], -1)
        return torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), inner_k_tiles)

    monkeypatch.setattr(torch, "_convert_weight_to_int4pack", convert)
    monkeypatch.setattr(torch, "_weight_int4pack_mm", torch._weight_int4pack_mm_for_cpu)
    monkeypatch.setattr(e2e, "_CHOSEN_PACKING", {})
    assert e2e.cuda_int4_packing(torch.device("cpu")) == "uint8, even column in the high nibble"
    low = e2e.CUDA_INT4_PACKINGS["uint8, even column in the low nibble"]
    monkeypatch.setitem(e2e.CUDA_INT4_PACKINGS, "uint8, even column in the high nibble", low)
    monkeypatch.setattr(e2e, "_CHOSEN_PACKING", {})
    with pytest.raises(RuntimeError, match="no known layout") as info:
        e2e.cuda_int4_packing(torch.device("cpu"))
    assert "rel err" in str(info.value) and "int32 codes (torch < 2.5): RuntimeError" in str(
        info.value)


def test_int4_rejects_partial_group(e2e):
    with pytest.raises(ValueError, match="not a multiple of group 128"):
        e2e.quantize_int4(torch.randn(8, 192), 128, torch.float32)


def test_swap_rewrites_every_decoder_linear_and_keeps_tied_lm_head(e2e, tiny):
    import copy

    model = copy.deepcopy(tiny)
    fqns = e2e.decoder_linears(model, with_lm_head=False)
    assert "lm_head" not in fqns and len(fqns) == 7 * e2e.TINY["num_hidden_layers"]
    e2e.swap_int4(model, fqns, 128)
    left = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert left == ["lm_head"]
    assert model.lm_head.weight is model.get_input_embeddings().weight  # still tied
    assert sum(isinstance(m, e2e.TorchInt4Linear) for m in model.modules()) == len(fqns)


def test_lm_head_int4_unties_and_swaps_all(e2e, tiny):
    import copy

    model = copy.deepcopy(tiny)
    e2e.untie_lm_head(model)
    emb = model.get_input_embeddings().weight.detach().clone()
    fqns = e2e.decoder_linears(model, with_lm_head=True)
    e2e.swap_int4(model, fqns, 128)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert torch.equal(model.get_input_embeddings().weight, emb)  # the embedding is untouched


def test_free_linear_shapes(e2e):
    x = torch.randn(1, 3, 64)
    for out in (16, 64, 200):
        y = e2e.FreeLinear(64, out)(x)
        assert y.shape == (1, 3, out) and y.is_contiguous()


def test_decode_loop_matches_hf_generate(e2e, tiny):
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, e2e.TINY["vocab_size"], (1, 5), generator=g)
    n = 6
    ours = e2e.greedy_tokens(tiny, prompt, n, max_cache_len=32)
    with torch.no_grad():
        hf = tiny.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False)
    assert ours == hf[0, prompt.shape[1]:].tolist()


def test_decode_logits_match_full_forward(e2e, tiny):
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(0, e2e.TINY["vocab_size"], (1, 4), generator=g)
    dec = e2e.Decoder(tiny, 32)
    dec.prefill(prompt)
    seq = torch.cat([prompt, dec.token], dim=1)
    for _ in range(3):
        tok, logits = dec.step()
        with torch.no_grad():
            ref = tiny(input_ids=seq, use_cache=False).logits[:, -1]
        # fp32; the static cache attends over masked slots (exact zeros after softmax) and
        # sums in another order than the cacheless forward
        torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-5)
        seq = torch.cat([seq, tok], dim=1)


def test_decoder_refuses_to_overflow_the_cache(e2e, tiny):
    dec = e2e.Decoder(tiny, 5)
    dec.prefill(torch.zeros(1, 4, dtype=torch.long))
    dec.step()
    with pytest.raises(RuntimeError, match="static cache full"):
        dec.step()


def test_bucket_of_known_kernel_names(e2e):
    cases = {
        "tinygemm_m16n8k16_chunk_kernel<...>": "linear",
        "nvjet_tst_64x8_64x16_4x1_v_bz_TNT": "linear",
        "_quant_gemv_kernel": "linear",
        "fmha_cutlassF_bf16_aligned_64x64_rf_sm80": "attention",
        "pytorch_flash::flash_fwd_kernel<...>": "attention",
        "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0": "rest",
        "Memcpy DtoD (Device -> Device)": "copy",
    }
    assert {n: e2e.bucket_of(n) for n in cases} == cases


def test_bounds_arithmetic(e2e):
    rows = [
        {"variant": "dense", "ms_per_token": 2.0, "linear_bytes": 1000,
         "profile": {"linear": 1.2}, "linears_alone_ms": 1.0},
        {"variant": "slimfx", "ms_per_token": 1.2, "linear_bytes": 250},
        {"variant": "floor", "ms_per_token": 0.7, "linear_bytes": 0},
    ]
    b = e2e.bounds(rows, bw=1e6)  # 1 MB/s: 250 bytes take 0.25 ms
    v = b["variants"]["slimfx"]
    assert v["byte_ratio"] == pytest.approx(0.25)
    assert v["bound_profiled"] == pytest.approx(2.0 / (1.2 * 0.25 + 0.8))
    assert v["bound_alone"] == pytest.approx(2.0 / (1.0 * 0.25 + 1.0))
    assert v["floor_plus_bw"] == pytest.approx(2.0 / (0.7 + 0.25))
    assert b["rest_cap_profiled"] == pytest.approx(2.0 / 0.8)
    assert b["floor_speedup"] == pytest.approx(2.0 / 0.7)


def test_main_cpu_tiny_end_to_end(e2e, tmp_path, capsys):
    needs_triton_kernels()
    out = tmp_path / "e2e.json"
    rc = e2e.main(["--device", "cpu", "--tiny", "--tokens", "2", "--runs", "1", "--warmup", "1",
                   "--profile-steps", "1", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    assert set(rows) == {"dense", "int4", "slimfx", "floor"}
    assert all(r["tok_s"] > 0 and "error" not in r for r in rows.values())
    # every swapped variant reads fewer weight bytes than dense; slimfx stays inside budget 0.3
    # of the rewritten linears' bf16-equivalent bytes (lm_head, dense, is outside the budget)
    assert rows["int4"]["linear_bytes"] < rows["dense"]["linear_bytes"]
    assert "0.3" in rows["slimfx"]["slimfx"]["summary"]
    assert rows["int4"]["int4_check_rel_err"] < 1e-4
    # the quantized models still compute nearly the dense model's logits (random weights,
    # int4 RTN: cosine ≈ 0.99); a broken packing or a wrong swap gives ≈ 0
    assert rows["int4"]["logits_cos"] > 0.9 and rows["slimfx"]["logits_cos"] > 0.9
    assert "| slimfx |" in capsys.readouterr().out
