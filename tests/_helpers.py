"""Seeded test data shared by the numerics, cost and passes tests of the 2:4 and combined
forms, the torch reference of the ONNX KV-cache decode tests, and the loader of benchmark
scripts for their smoke tests. Imported as ``from _helpers import …``: pytest puts ``tests/`` on ``sys.path`` when it
loads ``tests/conftest.py`` (that folder is not a package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch


def gen(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def calib_tokens(n: int = 6, length: int = 32, seed: int = 0, vocab: int = 256) -> list[torch.Tensor]:
    """``n`` random (1, ``length``) token batches (a tiny model's calibration)."""
    g = gen(seed)
    return [torch.randint(0, vocab, (1, length), generator=g) for _ in range(n)]


def correlated_gram(
    in_f: int, n: int = 1024, seed: int = 0, channel_spread: float = 0.5
) -> torch.Tensor:
    """XᵀX (float64) of ``n`` inputs with correlated channels and log-normal channel scales
    (as LLM activations: a few channels carry most of the energy); ``channel_spread`` is the
    standard deviation of the log scales."""
    g = gen(seed)
    mix = torch.eye(in_f) + 2 * torch.randn(in_f, in_f, generator=g) / in_f**0.5
    X = torch.randn(n, in_f, generator=g) @ mix  # drawn before the scales, as it always was
    X = X * torch.exp(channel_spread * torch.randn(in_f, generator=g))
    return (X.T @ X).to(torch.float64)


def lowrank_plus_noise(out_f: int, in_f: int, seed: int = 1) -> torch.Tensor:
    """A weight that is a rank-8 component plus heavy-tailed noise (1% of entries 4× larger):
    neither low rank nor easy to quantize."""
    g = gen(seed)
    low = torch.randn(out_f, 8, generator=g) @ torch.randn(8, in_f, generator=g) * 0.3
    noise = torch.randn(out_f, in_f, generator=g)
    return low + noise * (1 + 3 * (torch.rand(out_f, in_f, generator=g) < 0.01))


def kv_torch_calls(model, forms, chunks, steps):  # noqa: ANN001, ANN201
    """Torch logits of each prefill chunk and of ``steps`` greedy decode steps with slimfx's
    ``KVCache`` of ``forms`` (per layer, a sequence or an index → form dict); returns (logits
    per call, the tokens fed at each decode step, the cache)."""
    from slimfx.forms.kv.cache import KVCache

    cache = KVCache([forms[i] for i in range(len(forms))])
    logits, fed = [], []
    with torch.no_grad():
        for c in chunks:
            logits.append(model(input_ids=c, past_key_values=cache, use_cache=True).logits)
        for _ in range(steps):
            nxt = logits[-1][:, -1].argmax(-1)[:, None]
            fed.append(nxt)
            logits.append(model(input_ids=nxt, past_key_values=cache, use_cache=True).logits)
    return logits, fed, cache


def codes_close(got, want, bits: int, name: str, scale=None) -> None:  # noqa: ANN001
    """Packed ``bits``-bit codes (numpy, same shape) equal up to one step at a few places: ORT's
    k/v projections differ from torch's in the last float32 bit, which can move a float16
    scale/minimum by one ulp and a code by one step at a rounding boundary. ``scale``: the
    torch store's float16 scale of every code (the unpacked codes' shape); where it is
    subnormal (< 2^-14, a near-constant block) one ulp is up to a few percent of it, and a code
    near the top of the range may move by more steps there."""
    from slimfx.forms.kv.numerics import unpack_codes

    codes = [unpack_codes(torch.from_numpy(x), bits).int() for x in (got, want)]
    diff = (codes[0] - codes[1]).abs()
    if scale is not None:
        diff = diff.masked_fill(torch.as_tensor(scale).float() < 2**-14, 0)
    assert diff.max() <= 1 and (diff == 0).float().mean() > 0.99, name


def kv_ort_matches_torch(model, dec, forms, ids, steps: int, atol: float):  # noqa: ANN001, ANN201
    """Prefill ``ids`` and decode ``steps`` greedy tokens in torch (:func:`kv_torch_calls`) and
    through the ONNX decoder ``dec`` (reset to the batch); every call's logits agree within
    ``atol``. Returns the torch cache."""
    import numpy as np

    ref, fed, cache = kv_torch_calls(model, forms, [ids], steps=steps)
    dec.reset(batch=ids.shape[0])
    got = [dec.step(ids)] + [dec.step(t) for t in fed]
    assert len(got) == len(ref) == steps + 1
    for i, (g, r) in enumerate(zip(got, ref)):
        np.testing.assert_allclose(g, r.numpy(), atol=atol, rtol=0, err_msg=f"call {i}")
    return cache


def left_padded(seed: int, lengths: tuple[int, ...], vocab: int = 256):  # noqa: ANN201
    """A batch of prompts of ``lengths`` left-padded to the longest (pad id 0) and its mask."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.zeros(len(lengths), n, dtype=torch.long)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for r, t in enumerate(lengths):
        ids[r, n - t :] = torch.randint(1, vocab, (t,), generator=g)
        mask[r, n - t :] = 1
    return ids, mask


def kv_padded_ort_matches_torch(model, dec, forms, ids, mask, steps: int, atol: float):  # noqa: ANN001, ANN201
    """A left-padded batch under its ``mask``: the prefill and ``steps`` greedy steps in torch
    with slimfx's ``KVCache`` of ``forms`` (positions and mask as ``generate()`` gives them)
    and through the ONNX decoder ``dec``; every call's logits agree within ``atol`` on the
    real rows, and ``dec.generate`` gives HF ``generate()``'s tokens. Returns the tokens."""
    import numpy as np

    from slimfx.forms.kv.cache import KVCache

    forms = [forms[i] for i in range(len(forms))]
    cache, m, x = KVCache(forms), mask.clone(), ids
    dec.reset(batch=ids.shape[0])
    with torch.no_grad():
        for i in range(steps + 1):
            pos = (m.cumsum(-1) - 1).masked_fill(m == 0, 0)[:, -x.shape[1] :]
            ref = model(input_ids=x, attention_mask=m, position_ids=pos, past_key_values=cache,
                        use_cache=True).logits  # fmt: skip
            got = dec.step(x, m.numpy()) if i == 0 else dec.step(x)
            real = m[:, -x.shape[1] :].bool().numpy()
            np.testing.assert_allclose(got[real], ref.numpy()[real], atol=atol, rtol=0,
                                       err_msg=f"call {i}")  # fmt: skip
            x = ref[:, -1].argmax(-1)[:, None]
            m = torch.cat([m, torch.ones_like(x)], dim=1)
        want = model.generate(ids, attention_mask=mask, past_key_values=KVCache(forms),
                              max_new_tokens=steps, do_sample=False, pad_token_id=0)  # fmt: skip
    eos = model.generation_config.eos_token_id  # generate() ends rows there: so does dec
    got = dec.generate(ids, steps, attention_mask=mask, eos_token_id=eos, pad_token_id=0)
    np.testing.assert_array_equal(got, want.numpy())
    return got


def tiny_qwen2_biased(attn: str = "sdpa", layers: int = 2):  # noqa: ANN201
    """A ``layers``-layer Qwen2ForCausalLM (hidden 64, 4 heads, 2 kv heads, vocab 256), eval
    mode, seeded, its biases drawn large (N(0, 0.5)) so that a test sees them in the K/V it
    checks."""
    import transformers as tf

    cfg = tf.Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, attn_implementation=attn)  # fmt: skip
    torch.manual_seed(0)
    model = tf.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.5)
    return model


def lowrank_qwen2(attn: str, forms: list):  # noqa: ANN201
    """:func:`tiny_qwen2_biased` with layer ``i``'s attention rewritten to the low-rank KV
    form ``forms[i]`` (factors fitted on three seeded random calibration sequences)."""
    from slimfx.forms.kv.calibrate import attention_grams, fit_site
    from slimfx.forms.kv.lowrank import apply_lowrank_kv
    from slimfx.ir.find import inspect_attention_sites

    model = tiny_qwen2_biased(attn)
    sites, _ = inspect_attention_sites(model)
    g = torch.Generator().manual_seed(5)
    grams = attention_grams(model, sites, [torch.randint(3, 256, (1, 24), generator=g)] * 3)
    factors = {s.fqn: fit_site(model, s, grams[s.fqn], forms[i]) for i, s in enumerate(sites)}
    apply_lowrank_kv(model, sites, {s.fqn: forms[i] for i, s in enumerate(sites)}, factors)
    return model


def lowrank_decode(model, ids, mask, forms, absorb: bool, steps: int = 12, static: bool = False):  # noqa: ANN001, ANN201
    """Prefill ``ids`` (under ``mask``) into slimfx's cache of ``forms``, then ``steps`` greedy
    one-token calls; the logits of every decode call. ``absorb``: the low-rank attention's
    absorbed one-token path (else values rebuilt); ``static``: the branch-free static latent
    layers (sinks merged by a gather) instead of the dynamic ones."""
    from slimfx.forms.kv.cache import KVCache
    from slimfx.forms.kv.lowrank import LowRankKVAttention
    from slimfx.forms.kv.static_cache import StaticKVCache

    LowRankKVAttention.absorb_decode = absorb
    try:
        cache = StaticKVCache(forms, ids.shape[1] + steps) if static else KVCache(forms)
        out = []
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            r = model(ids, attention_mask=mask, position_ids=pos, past_key_values=cache)
            for _ in range(steps):
                tok = r.logits[:, -1:].argmax(-1)
                mask = torch.cat([mask, torch.ones_like(tok)], 1)
                pos = pos[:, -1:] + 1
                r = model(tok, attention_mask=mask, position_ids=pos, past_key_values=cache)
                out.append(r.logits)
    finally:
        LowRankKVAttention.absorb_decode = True
    return torch.cat(out, 1)


def compiled_static_steps(model, ids, forms, max_len: int, steps: int, backend, atol: float):  # noqa: ANN001, ANN201
    """Prefill ``ids`` eagerly into two ``StaticKVCache`` of ``forms`` (as transformers does),
    then ``steps`` greedy one-token steps of the whole model, eager on one cache and compiled
    (``fullgraph``, ``backend``) on the other; every step's logits agree within ``atol``.
    Returns the compiled run's cache."""
    from slimfx.forms.kv.static_cache import StaticKVCache

    eager, comp = StaticKVCache(forms, max_len), StaticKVCache(forms, max_len)
    with torch.no_grad():
        for c in (eager, comp):
            out = model(ids, past_key_values=c, use_cache=True)
        torch._dynamo.reset()

        def step(tok, pos, cache):  # noqa: ANN001, ANN202
            return model(tok, position_ids=pos, past_key_values=cache, use_cache=True).logits

        compiled = torch.compile(step, fullgraph=True, backend=backend, dynamic=False)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        n = ids.shape[1]
        for t in range(n, n + steps):
            pos = torch.full((ids.shape[0], 1), t)
            want = step(tok, pos, eager)
            torch.testing.assert_close(compiled(tok, pos, comp), want, atol=atol, rtol=atol)
            tok = want[:, -1].argmax(-1, keepdim=True)
    return comp


def load_benchmark(name: str) -> ModuleType:
    """The script ``benchmarks/<name>.py`` as a module (benchmarks are scripts, not a package)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"slimfx_bench_{name}", script)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def needs_triton_kernels() -> None:
    """Skip the calling test where the Triton kernels cannot run: no triton, or on the CPU an
    interpreter too old for them (``slimfx.kernels.interpreter_reason``: triton < 3.7)."""
    import pytest

    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        from slimfx.kernels import interpreter_reason

        why = interpreter_reason()
        if why:
            pytest.skip(why)
