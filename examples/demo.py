"""`make demo`: optimize SmolLM2-135M on real news text under one budget, print the report
and the perplexity before and after, write the plot, and export the result to ONNX with its
KV-cache decode step, run in onnxruntime; then the same weights budget with the KV cache in it
(`Budget(memory=…, kv=…, context=8192)`): the cache form the solver picks per layer, the
perplexity, and the cache measured after a 2048-token prompt.

    python examples/demo.py [--budget 0.3] [--kv 0.25] [--families lowrank,int8,int4,int4_gptq]
                            [--out out/demo] [--no-fisher] [--no-onnx] [--no-kv]

The budget is a fraction of the linears' bytes at 16 bits per weight (0.3 ≈ 4.8 bits/weight,
scales and zero points counted); the solver mixes the families per layer. ``--kv`` is a
fraction of the 16-bit cache's bytes at 8192 tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import slimfx
from slimfx.data.text import calibration_batches, heldout_windows
from slimfx.eval import perplexity
from slimfx.models import load_smollm2
from slimfx.planning.configs import DEFAULT_FAMILIES


def decode_ms(model: torch.nn.Module, prompt: torch.Tensor, n: int = 24) -> float:
    """Greedy decode time per token after the first (prefill) one, in ms."""
    model.generate(prompt, max_new_tokens=2, do_sample=False)  # warm up
    t0 = time.perf_counter()
    model.generate(prompt, max_new_tokens=1, min_new_tokens=1, do_sample=False)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return (time.perf_counter() - t0 - first) / (n - 1) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=0.3)
    ap.add_argument("--families", default=",".join(DEFAULT_FAMILIES))
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--n-eval", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--out", default="out/demo")
    ap.add_argument("--no-fisher", action="store_true", help="unweighted error (faster)")
    ap.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    ap.add_argument("--kv", type=float, default=0.25, help="KV-cache budget (fraction)")
    ap.add_argument("--no-kv", action="store_true", help="skip the KV-cache part (~3 min)")
    a = ap.parse_args()
    torch.manual_seed(0)

    t0 = time.perf_counter()
    model, tok = load_smollm2()
    print(f"loaded SmolLM2-135M-Instruct in {time.perf_counter() - t0:.1f} s")
    calib = calibration_batches(tok, name="lee", n=a.n_calib, seq_len=a.seq_len)
    held = heldout_windows(tok, name="lee", n=a.n_eval, seq_len=a.seq_len)

    t0 = time.perf_counter()
    small = slimfx.optimize(
        model, a.budget, calibration=calib, families=tuple(a.families.split(",")),
        fisher=not a.no_fisher,
    )
    print(f"optimize: {time.perf_counter() - t0:.1f} s")
    rep = slimfx.report_of(small)
    print(rep)

    p0 = perplexity(model, held)
    p1 = perplexity(small, held)
    print(
        f"\nperplexity on held-out news text ({held.shape[0]} windows × {held.shape[1]} tokens): "
        f"dense {p0:.2f} → slimfx {p1:.2f} ({100 * (p1 / p0 - 1):+.1f}%)"
    )
    prompt = tok("The weather in Sydney today", return_tensors="pt").input_ids
    out = small.generate(prompt, max_new_tokens=20, do_sample=False)
    print("generate():", tok.decode(out[0], skip_special_tokens=True))
    # alternated, three times each, the median: one pass moves ±20% on a shared machine
    runs = [(name, decode_ms(m, prompt)) for _ in range(3)
            for name, m in (("dense", model), ("slimfx", small))]  # fmt: skip
    ms = {k: statistics.median(v for n, v in runs if n == k) for k in ("dense", "slimfx")}
    print(f"decode in PyTorch eager on this CPU: dense {ms['dense']:.1f} ms/token, slimfx "
          f"{ms['slimfx']:.1f} ms/token ({ms['dense'] / ms['slimfx']:.2f}× the tokens/s, median "
          f"of 3 alternated runs on {torch.get_num_threads()} threads; int4/int8 linears on "
          "torch's packed kernels)")

    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)  # a fresh checkout has no out/ yet
    if not a.no_onnx:
        t0 = time.perf_counter()
        res = slimfx.export_onnx(small, out_dir / "smollm2_kv.onnx", (prompt,), kv_cache=True)
        print(f"\nONNX ({time.perf_counter() - t0:.1f} s): {res}")
        ort_model = slimfx.ort_session(res.path)
        ort_out = ort_model.generate(prompt, 20)
        same = "same tokens as torch" if torch.equal(ort_out, out) else "DIFFERENT tokens"
        print(f"onnxruntime generate() with the KV cache ({same}):",
              tok.decode(ort_out[0], skip_special_tokens=True))
        padded_batch(small, ort_model, tok)
    save_dir = out_dir / "model"  # a slimfx save holds its own files only: the ONNX sits beside
    slimfx.save(
        small,
        save_dir,
        extras={"report.md": lambda p: p.write_text(rep.to_markdown()), "report.png": rep.plot},
    )
    print(f"wrote {save_dir}/: report.md, report.json, plan.json, report.png, slimfx.safetensors")
    if not a.no_kv:
        kv_cache(model, tok, calib, held, a, prompt, p1)


def kv_cache(model, tok, calib, held, a, prompt, p_weights) -> None:  # noqa: ANN001
    """The weights budget with the KV cache in it: the cache forms per layer, the perplexity,
    greedy tokens with the cache held compressed, and the cache measured after a long prompt."""
    from slimfx.forms.kv.cache import KVCache

    t0 = time.perf_counter()
    budget = slimfx.Budget(memory=a.budget, kv=a.kv, context=8192)
    both = slimfx.optimize(model, budget, calibration=calib,
                           families=tuple(a.families.split(",")), fisher=not a.no_fisher)  # fmt: skip
    print(f"\nweights and KV cache under one budget (memory={a.budget}, kv={a.kv}, "
          f"context=8192): optimize {time.perf_counter() - t0:.1f} s")
    for line in str(slimfx.report_of(both)).splitlines():
        if line.startswith(("slimfx:", "KV cache")):
            print(line)
    p = perplexity(both, held)
    print(f"perplexity: {p:.2f} (weights alone {p_weights:.2f}; {held.shape[1]}-token windows "
          "read part of their past from the 16-bit window and sinks, so a long context loses "
          "more: benchmarks/kv_mix.py --steady)")
    out = both.generate(prompt, max_new_tokens=20, do_sample=False)
    print("generate() with the compressed cache:", tok.decode(out[0], skip_special_tokens=True))
    long = heldout_windows(tok, name="lee", n=1, seq_len=2048)
    held_mb = {}
    for name, m in (("dense", model), ("slimfx", both)):
        cache = KVCache.for_model(m)  # what generate() holds (the forms the model carries)
        with torch.no_grad():  # the prompt, then one token: a step moves full blocks to the store
            nxt = m(input_ids=long, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            m(input_ids=nxt, past_key_values=cache, use_cache=True)
        held_mb[name] = cache.nbytes() / 2**20
    print(f"KV cache after a {long.shape[1]}-token prompt and a token (fp32 model): "
          f"{held_mb['dense']:.1f} MB → {held_mb['slimfx']:.1f} MB "
          f"({held_mb['slimfx'] / held_mb['dense']:.2f}×; the tokens of a block not yet full "
          "stay in the model's precision)")


def padded_batch(small, ort_model, tok) -> None:  # noqa: ANN001
    """Prompts of different lengths in one left-padded batch, in ONNX Runtime and in torch:
    each row's new tokens against its prompt decoded alone."""
    texts = ["Rain", "The bushfires near Sydney", "Prime Minister John Howard said on Tuesday"]
    tok.padding_side = "left"
    batch = tok(texts, padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    kw = dict(eos_token_id=small.generation_config.eos_token_id, pad_token_id=tok.pad_token_id)

    def new(out: torch.Tensor, n: int) -> str:  # the new tokens (an ended row's padding dropped)
        return tok.decode(out[n:], skip_special_tokens=True)

    ort_rows = [new(g, ids.shape[1]) for g in ort_model.generate(ids, 12, mask, **kw)]
    torch_rows = [new(g, ids.shape[1]) for g in small.generate(
        ids, attention_mask=mask, max_new_tokens=12, do_sample=False, **kw)]  # fmt: skip
    same = {"onnxruntime": 0, "torch": 0}
    for t, o, p in zip(texts, ort_rows, torch_rows):
        one = tok(t, return_tensors="pt").input_ids
        same["onnxruntime"] += o == new(ort_model.generate(one, 12, **kw)[0], one.shape[1])
        alone = small.generate(one, max_new_tokens=12, do_sample=False, **kw)[0]
        same["torch"] += p == new(alone, one.shape[1])
    print(f"{len(texts)} prompts in one left-padded batch (attention_mask), rows = the prompt "
          f"decoded alone: onnxruntime {same['onnxruntime']}/{len(texts)}, torch "
          f"{same['torch']}/{len(texts)}; onnxruntime:", " | ".join(ort_rows))


if __name__ == "__main__":
    main()
