"""Prompts of different lengths in one ONNX Runtime batch, left-padded under their mask.

SmolLM2-135M (fp32), 8 prompts cut from the news corpus's second half at 8 different lengths,
left-padded by the tokenizer into one batch. Three decode-step exports: the plain one
(``export_onnx(..., kv_cache=True)``, 16-bit cache), the int4 KV cache (``export_onnx_kv``,
KIVI-style int4 keys and values) and a low-rank cache (``kv_lowrank`` at 3/4 of the cache, 4
exact sink tokens, fitted on the first half). For each: greedy tokens of the padded batch in
ONNX Runtime against Hugging Face ``generate()`` on the same batch in torch (the compressed
caches through slimfx's ``KVCache``) and against each prompt decoded alone in ONNX Runtime;
the wall time of the batch vs the prompts one by one (1 thread); the perplexity of the real
text that follows each prompt (fed one token a step after it) in the batch vs alone.

    OMP_NUM_THREADS=1 python benchmarks/ort_padded_batch.py [--new 16] [--follow 48]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import dump, run_meta

from slimfx.backends.onnx import export_onnx
from slimfx.backends.onnx_kv import export_onnx_kv
from slimfx.backends.onnx_kv_decoder import OrtKVDecoder
from slimfx.backends.ort import ort_session
from slimfx.data.text import calibration_batches, news_text
from slimfx.forms.kv.cache import KVCache
from slimfx.forms.kv.calibrate import attention_grams, fit_site
from slimfx.forms.kv.config import KVLowRankConfig, KVQuantConfig
from slimfx.forms.kv.lowrank import apply_lowrank_kv
from slimfx.ir.find import inspect_attention_sites
from slimfx.models import load_smollm2

LENGTHS = (9, 61, 23, 40, 14, 52, 31, 6)
INT4 = KVQuantConfig(4, 4, 32, 64, 0, 4)
LOWRANK = KVLowRankConfig(96, 192, 1, "whitened", 4)  # 3/4 of the cache, 4 sink tokens


def prompts(tok: object, follow: int) -> tuple[dict, torch.Tensor]:
    """The left-padded batch of the second half's first articles cut at ``LENGTHS`` tokens,
    and the ``follow`` tokens that follow each cut (batch, follow)."""
    docs = [d.strip() for d in news_text().split("\n\n") if d.strip()]
    docs = [d for d in docs[len(docs) // 2 :] if len(tok(d)["input_ids"]) >= 64 + follow]
    ids = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    tok.padding_side = "left"
    enc = tok.pad({"input_ids": [x[:n] for x, n in zip(ids, LENGTHS)]}, return_tensors="pt")
    return enc, torch.tensor([x[n : n + follow] for x, n in zip(ids, LENGTHS)])


class _Steps:
    """One interface over ``OrtModel`` (cache passed in and out) and ``OrtKVDecoder`` (cache
    held): ``reset(batch)``, ``step(ids, mask) -> logits``."""

    def __init__(self, runner: object) -> None:
        self.runner, self.past = runner, None

    def reset(self, batch: int) -> None:
        self.past = None
        if isinstance(self.runner, OrtKVDecoder):
            self.runner.reset(batch)

    def step(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if isinstance(self.runner, OrtKVDecoder):
            return self.runner.step(ids, mask)
        logits, self.past = self.runner.step(ids, self.past, attention_mask=mask)
        return logits


def follow_nll(steps: _Steps, ids: torch.Tensor, mask: torch.Tensor, follow: torch.Tensor):  # noqa: ANN201
    """Mean negative log-likelihood per row of the real ``follow`` tokens, fed one a step after
    the prompt (as decoding reads them): (batch,) float64."""
    steps.reset(ids.shape[0])
    m = mask.numpy().astype(np.int64)
    logits = steps.step(ids.numpy(), m)[:, -1]
    nll = np.zeros(ids.shape[0])
    for t in range(follow.shape[1]):
        x = logits.astype(np.float64)
        lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
        nll += lse - x[np.arange(len(x)), follow[:, t].numpy()]
        if t + 1 < follow.shape[1]:
            m = np.concatenate([m, np.ones((len(x), 1), np.int64)], axis=1)
            logits = steps.step(follow[:, t : t + 1].numpy(), m)[:, -1]
    return nll / follow.shape[1]


def timed(fn):  # noqa: ANN001, ANN201
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--follow", type=int, default=48)
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    model, tok = load_smollm2()
    model = model.float().eval()
    enc, follow = prompts(tok, a.follow)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    gen = dict(eos_token_id=model.generation_config.eos_token_id, pad_token_id=pad)
    alone = [ids[r : r + 1, int((mask[r] == 0).sum()) :] for r in range(ids.shape[0])]
    layers = model.config.num_hidden_layers
    print(f"{ids.shape[0]} prompts of {sorted(LENGTHS)} tokens, padded to {ids.shape[1]}; "
          f"{a.new} new tokens each")  # fmt: skip
    rows = []

    def measure(name: str, runner: object, form: object) -> None:
        cache = {} if form is None else {"past_key_values": KVCache([form] * layers)}
        with torch.no_grad():
            ref = model.generate(ids, attention_mask=mask, max_new_tokens=a.new,
                                 do_sample=False, **gen, **cache)  # fmt: skip
        got, t_batch = timed(lambda: np.asarray(
            runner.generate(ids.numpy(), a.new, attention_mask=mask.numpy(), **gen)))  # fmt: skip
        one, t_one = timed(lambda: [np.asarray(runner.generate(x.numpy(), a.new, **gen))
                                    for x in alone])  # fmt: skip
        new = got[:, -a.new :]
        nll_pad = follow_nll(_Steps(runner), ids, mask, follow)
        nll_one = np.concatenate([
            follow_nll(_Steps(runner), x, torch.ones_like(x), follow[r : r + 1])
            for r, x in enumerate(alone)
        ])  # fmt: skip
        row = dict(
            cache=name,
            rows_equal_torch=int((new == ref[:, -a.new :].numpy()).all(1).sum()),
            rows_equal_alone=int(sum((new[r] == o[0, -a.new :]).all()
                                     for r, o in enumerate(one))),  # fmt: skip
            batch_s=t_batch,
            one_by_one_s=t_one,
            speedup=t_one / t_batch,
            ppl_padded=float(np.exp(nll_pad.mean())),
            ppl_alone=float(np.exp(nll_one.mean())),
            max_row_nll_diff=float(np.abs(nll_pad - nll_one).max()),
        )
        rows.append(row)
        n = ids.shape[0]
        print(f"| {name} | {row['rows_equal_torch']}/{n} | {row['rows_equal_alone']}/{n} | "
              f"{t_batch:.2f} s | {t_one:.2f} s | {row['speedup']:.2f}× | "
              f"{row['ppl_padded']:.3f} / {row['ppl_alone']:.3f} | "
              f"{row['max_row_nll_diff']:.4f} |", flush=True)  # fmt: skip

    with tempfile.TemporaryDirectory() as d:
        plain = export_onnx(model, Path(d) / "plain.onnx", (ids[:1, :4],), kv_cache=True)
        measure("16-bit cache (export_onnx kv_cache=True)", ort_session(plain.path, threads=1),
                None)  # fmt: skip
        kv = export_onnx_kv(model, Path(d) / "int4.onnx", INT4)
        measure(f"{INT4.short()} (export_onnx_kv)", OrtKVDecoder(kv.path, threads=1), INT4)
        # a low-rank cache (the k/v projections factorized, fitted on the corpus's first half)
        sites, _ = inspect_attention_sites(model)
        grams = attention_grams(model, sites, calibration_batches(tok, name="lee", n=8))
        forms = {s.fqn: LOWRANK for s in sites}
        factors = {s.fqn: fit_site(model, s, grams[s.fqn], LOWRANK) for s in sites}
        apply_lowrank_kv(model, sites, forms, factors)
        kv = export_onnx_kv(model, Path(d) / "lowrank.onnx")
        measure(f"{LOWRANK.short()} (export_onnx_kv)", OrtKVDecoder(kv.path, threads=1),
                LOWRANK)  # fmt: skip
    print("columns: cache | rows = HF generate() on the padded batch in torch | rows = the "
          "prompt alone in ORT | padded batch | one by one | speed-up | perplexity of the "
          f"{a.follow} real tokens after each prompt, padded batch / each alone | largest "
          "per-row difference of their mean NLL")
    if a.json:
        dump(a.json, run_meta(lengths=LENGTHS, new=a.new), rows)


if __name__ == "__main__":
    main()
