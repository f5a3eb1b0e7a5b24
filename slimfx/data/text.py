"""Real English text for calibration and evaluation, and fixed-length token windows of it.

The corpora ship as test data inside the ``gensim`` wheel (installed with ``--no-deps``; the
package itself is never imported, only its data files are read):

- ``"lee"`` / ``"news"``: ``lee_background.cor``, 300 Australian news articles (Lee corpus),
  one article per line; about 360 kB of prose.
- ``"wiki"``: ``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``, a
  Wikipedia XML dump excerpt; the article wikitext is reduced to plain paragraphs (see
  :func:`wikitext_to_prose`).

Calibration / evaluation split (:data:`CALIBRATION_FRACTION`): the corpus is tokenized once;
the FIRST half of its tokens is the calibration part and the LAST half the held-out part.
:func:`calibration_batches` draws windows only from the first part and
:func:`heldout_windows` only from the last, so no token position is used by both.
"""

from __future__ import annotations

import bz2
import html
import importlib.util
import os
import re
import xml.etree.ElementTree as ET
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CALIBRATION_FRACTION",
    "CORPORA",
    "calibration_batches",
    "corpus",
    "corpus_tokens",
    "heldout_windows",
    "news_text",
    "split_tokens",
    "token_windows",
    "wiki_text",
    "wikitext_to_prose",
]

#: Share of a corpus's tokens (from the start) reserved for calibration; the rest is held out.
CALIBRATION_FRACTION = 0.5

_GENSIM_HINT = "pip install --no-deps gensim==4.4.0"
_LEE_FILE = "lee_background.cor"
_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def _gensim_test_data() -> str:
    """Folder of gensim's bundled test data, found without importing gensim."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "slimfx's real text corpora are read from the gensim wheel's test data, but gensim "
            f"is not installed; install it with: {_GENSIM_HINT}"
        )
    folder = os.path.join(list(spec.submodule_search_locations)[0], "test", "test_data")
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"gensim is installed but has no test data folder at {folder}; reinstall with: "
            f"{_GENSIM_HINT}"
        )
    return folder


@lru_cache(maxsize=1)
def news_text() -> str:
    """The Lee background news corpus: 300 articles, one paragraph each, joined by blank lines."""
    path = os.path.join(_gensim_test_data(), _LEE_FILE)
    with open(path, encoding="utf-8", errors="replace") as f:
        articles = [" ".join(line.split()) for line in f]
    return "\n\n".join(a for a in articles if a)


# --- Wikipedia markup → prose -------------------------------------------------------------

# Tags whose whole content is dropped (citations, formulas, galleries, code, ...).
_DROP_TAGS = (
    "ref",
    "math",
    "gallery",
    "timeline",
    "syntaxhighlight",
    "source",
    "pre",
    "score",
    "imagemap",
    "chem",
    "hiero",
    "graph",
    "mapframe",
    "references",
    "table",
    "noinclude",
)
_RE_COMMENT = re.compile(r"<!--.*?-->", re.S)
_RE_SELF_CLOSING_REF = re.compile(r"<ref\b[^>]*/>", re.I)
_RE_DROP_TAG = re.compile(r"<(" + "|".join(_DROP_TAGS) + r")\b[^>]*>.*?</\1\s*>", re.I | re.S)
_RE_TEMPLATE = re.compile(r"\{\{(?:[^{}]|\{(?!\{)|\}(?!\}))*\}\}", re.S)  # innermost {{...}}
_RE_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)  # innermost {| ... |}
_RE_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")  # innermost [[...]]
_RE_EXT_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]*(?:\s+([^\]]*))?\]")
_RE_BARE_URL = re.compile(r"https?://\S+")
_RE_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_RE_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$")
_RE_MAGIC = re.compile(r"__[A-Z]+__")
_RE_SPACE = re.compile(r"[ \t\u00a0]+")
# Sections after which an article is lists of references and links, not prose.
_TAIL_SECTIONS = {
    "references",
    "see also",
    "external links",
    "further reading",
    "notes",
    "bibliography",
    "sources",
    "footnotes",
    "citations",
    "notes and references",
    "works cited",
}
# Link namespaces that carry no prose (dropped whole, caption included).
_DROP_LINK_PREFIXES = ("file", "image", "media", "category", "wikipedia", "wp", "template")
_MIN_PARAGRAPH_WORDS = 8


def _resolve_link(match: re.Match[str]) -> str:
    """``[[target|label]]`` → ``label``; ``[[target]]`` → ``target``; media/category → ''."""
    body = match.group(1)
    target, _, _ = body.partition("|")
    if ":" in target:
        prefix = target.split(":", 1)[0].strip().lower()
        # File:/Category:/... and interlanguage links such as [[de:Anarchismus]].
        if prefix in _DROP_LINK_PREFIXES or re.fullmatch(r"[a-z]{2,3}(-[a-z]+)?", prefix):
            return ""
    label = body.rsplit("|", 1)[-1] if "|" in body else target
    return label.strip()


def _sub_until_stable(pattern: re.Pattern[str], repl: Any, text: str) -> str:
    """Apply ``pattern.sub`` until nothing changes (resolves nesting from the inside out)."""
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return text
        text = new


def wikitext_to_prose(wikitext: str) -> str:
    """Plain paragraphs from one article's MediaWiki markup.

    Drops comments, ``<ref>``/``<math>``/... elements, templates ``{{…}}``, tables ``{|…|}``,
    file/category/interlanguage links, headings, list and indented lines, and everything from
    the "References"/"See also"/"External links" sections on. Keeps link text
    (``[[a|b]]`` → ``b``), the label of external links, and paragraphs with at least
    8 words; a paragraph with unbalanced markup left over is dropped. Paragraphs are joined
    by blank lines.
    """
    text = html.unescape(wikitext)  # the dump escapes markup once more inside <text>
    text = _RE_COMMENT.sub("", text)
    text = _RE_SELF_CLOSING_REF.sub("", text)
    text = _sub_until_stable(_RE_DROP_TAG, "", text)
    text = _sub_until_stable(_RE_TEMPLATE, "", text)
    text = _sub_until_stable(_RE_TABLE, "", text)
    text = _sub_until_stable(_RE_LINK, _resolve_link, text)
    text = _RE_EXT_LINK.sub(lambda m: m.group(1) or "", text)
    text = _RE_BARE_URL.sub("", text)
    text = _RE_TAG.sub("", text)
    text = _RE_MAGIC.sub("", text)
    text = text.replace("'''", "").replace("''", "")

    paragraphs: list[str] = []
    for raw in text.split("\n"):
        line = raw.strip()
        heading = _RE_HEADING.match(line)
        if heading:
            if heading.group(2).strip().lower() in _TAIL_SECTIONS:
                break
            continue
        if not line or line[0] in "*#:;|!{}=" or line.startswith("----"):
            continue
        line = _RE_SPACE.sub(" ", line).strip()
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)  # "()" left by removed templates
        line = re.sub(r" +([,.;:])", r"\1", line).strip()
        leftover_markup = any(m in line for m in ("{{", "}}", "[[", "]]"))  # unbalanced
        if len(line.split()) >= _MIN_PARAGRAPH_WORDS and not leftover_markup:
            paragraphs.append(line)
    return "\n\n".join(paragraphs)


@lru_cache(maxsize=1)
def wiki_text() -> str:
    """Plain prose of the articles (namespace 0, no redirects) of gensim's Wikipedia excerpt."""
    path = os.path.join(_gensim_test_data(), _WIKI_FILE)
    articles: list[str] = []
    with bz2.open(path, "rb") as f:
        for _, elem in ET.iterparse(f, events=("end",)):
            if not elem.tag.endswith("}page"):
                continue
            ns = elem.findtext("{*}ns")
            body = elem.findtext("{*}revision/{*}text") or ""
            if ns == "0" and not body.lstrip().lower().startswith("#redirect"):
                prose = wikitext_to_prose(body)
                if prose:
                    articles.append(prose)
            elem.clear()
    return "\n\n".join(articles)


#: Corpus names accepted by :func:`corpus` and the loaders below.
CORPORA = {"lee": news_text, "news": news_text, "wiki": wiki_text}


def corpus(name: str) -> str:
    """The text of a named corpus: ``"lee"`` or ``"news"`` (Lee news) or ``"wiki"``."""
    try:
        loader = CORPORA[name]
    except KeyError:
        raise ValueError(
            f"unknown corpus {name!r}; known corpora: {', '.join(sorted(CORPORA))}"
        ) from None
    return loader()


# --- tokens and windows -------------------------------------------------------------------

_TOKEN_CACHE: list[tuple[Any, str, Tensor]] = []  # (tokenizer, text, ids); a few entries


def _tokenize(tokenizer: Any, text: str) -> Tensor:
    """All token ids of ``text`` (no special tokens) as a 1-D LongTensor, memoized."""
    for tok, txt, ids in _TOKEN_CACHE:
        if tok is tokenizer and txt is text:
            return ids
    out = tokenizer(text, add_special_tokens=False, verbose=False)
    ids = torch.as_tensor(out["input_ids"], dtype=torch.long).flatten()
    _TOKEN_CACHE.append((tokenizer, text, ids))
    del _TOKEN_CACHE[:-4]
    return ids


def token_windows(
    tokenizer: Any,
    text: str | Tensor,
    seq_len: int,
    n_windows: int | None = None,
    offset_windows: int = 0,
) -> Tensor:
    """Non-overlapping windows of the tokenized text, shape ``(n, seq_len)``.

    Window ``i`` holds tokens ``[(offset_windows + i) * seq_len, (offset_windows + i + 1) *
    seq_len)``. ``n_windows=None`` takes every full window after the offset. ``text`` may also
    be a 1-D tensor of token ids (then ``tokenizer`` is unused).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (one context and one target), got {seq_len}")
    if offset_windows < 0:
        raise ValueError(f"offset_windows must be >= 0, got {offset_windows}")
    ids = text.flatten().long() if isinstance(text, Tensor) else _tokenize(tokenizer, text)
    available = ids.numel() // seq_len - offset_windows
    if n_windows is None:
        n_windows = max(available, 0)
    if n_windows < 1 or n_windows > available:
        raise ValueError(
            f"asked for {n_windows} windows of {seq_len} tokens after {offset_windows} windows, "
            f"but the text has {ids.numel()} tokens ({max(available, 0)} windows available)"
        )
    start = offset_windows * seq_len
    return ids[start : start + n_windows * seq_len].reshape(n_windows, seq_len).clone()


def corpus_tokens(tokenizer: Any, name: str = "lee") -> Tensor:
    """All token ids of a named corpus, 1-D LongTensor."""
    return _tokenize(tokenizer, corpus(name))


def split_tokens(ids: Tensor) -> tuple[Tensor, Tensor]:
    """``(calibration, heldout)``: the first :data:`CALIBRATION_FRACTION` of ``ids`` and the rest."""
    cut = int(ids.numel() * CALIBRATION_FRACTION)
    return ids[:cut], ids[cut:]


def calibration_batches(
    tokenizer: Any, name: str = "lee", n: int = 16, seq_len: int = 256, seed: int = 0
) -> list[Tensor]:
    """``n`` calibration inputs, each a ``(1, seq_len)`` LongTensor, from the corpus's first half.

    The first half is cut into non-overlapping windows; ``seed`` picks ``n`` of them at random
    (without replacement), so the batches never overlap each other nor :func:`heldout_windows`.
    """
    calib, _ = split_tokens(corpus_tokens(tokenizer, name))
    grid = token_windows(None, calib, seq_len)  # raises if not even one window fits
    if n > grid.shape[0]:
        raise ValueError(
            f"asked for {n} calibration windows of {seq_len} tokens, but the calibration half "
            f"of corpus {name!r} holds only {grid.shape[0]}"
        )
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(grid.shape[0], generator=gen)[:n]
    return [grid[i].unsqueeze(0) for i in pick.tolist()]


def heldout_windows(
    tokenizer: Any, name: str = "lee", n: int | None = None, seq_len: int = 256
) -> Tensor:
    """The first ``n`` (default: all) non-overlapping windows of the corpus's last half."""
    _, heldout = split_tokens(corpus_tokens(tokenizer, name))
    return token_windows(None, heldout, seq_len, n_windows=n)
