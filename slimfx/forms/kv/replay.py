"""The quantized-cache error of a *cache-only* attention site: the block's own forward, replayed.

A cache-only site (``AttentionSite.cache_only``: Phi-3's fused ``qkv_proj``, Phi, OPT, GPT-2)
has no separate q/k/v/o linears for :func:`.simulate.block_forward` to recompute, so its
calibration call is kept whole (:class:`BlockCall`: the module's arguments, the cache left out)
and replayed through the module itself with transformers' attention function swapped for
:func:`simulated_attention`: it receives the block's exact queries and keys (after its RoPE and
norms) and values, and attends as a cache in the site's form would hold them
(:func:`.simulate.quantized_cache_attention`, the steady state of long context). The same
function with the 16-bit form gives the reference output, so both go through one attention.

The replay also checks the site: a block whose forward never reaches the attention interface,
or hands it keys of another shape than the site's heads and head_dim, raises
:class:`SiteMismatch`; :func:`check_replay` runs that check on one calibration call before
pricing, and such a block is dropped from the sites with the reason (its cache bytes, priced
from the site's shape, would be wrong too).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .config import KVDecision, KVDenseConfig
from .simulate import applies_softcap, quantized_cache_attention

__all__ = [
    "BlockCall", "SIMULATED_ATTENTION", "SiteMismatch", "check_replay", "replay_block",
    "simulated_attention",
]  # fmt: skip

SIMULATED_ATTENTION = "slimfx_kv_simulated"
_FORM_ATTR = "_slimfx_simulated_form"
_SEEN_ATTR = "_slimfx_simulated_calls"
#: whether the function the replay stands in for applies a ``softcap`` it is handed
#: (transformers' ``sdpa`` does not: 5.17 ignores it, later releases refuse it)
_APPLIES_CAP: ContextVar[bool] = ContextVar("slimfx_replay_applies_cap", default=True)
#: attention-function arguments that change the attention's math, which the simulation lacks
_UNSUPPORTED = ("s_aux", "sinks")


class SiteMismatch(ValueError):
    """The block does not attend as its cache-only site says (no attention-interface call, or
    keys of another shape)."""


@dataclass
class BlockCall:
    """One calibration call of an attention module: its positional and keyword arguments
    (detached; ``past_key_values`` left out)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def simulated_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """Transformers attention-function signature: causal attention of an unpadded call with
    the cache in the form the replay set on ``module`` (``attention_mask`` is taken to be the
    causal one). Returns ``(B, T, Hq, D)``."""
    form, shape = getattr(module, _FORM_ATTR)
    extra = [k for k in _UNSUPPORTED if kwargs.get(k) is not None]
    if extra:
        raise SiteMismatch(f"its attention takes {' / '.join(extra)}, which the cache "
                           "simulation lacks")  # fmt: skip
    if (key.shape[1], key.shape[-1]) != shape or query.shape[1] % key.shape[1]:
        raise SiteMismatch(
            f"it attends with {query.shape[1]} query and {key.shape[1]} key heads of "
            f"{key.shape[-1]} dims, not the {shape[0]} kv heads of {shape[1]} its config gives"
        )
    setattr(module, _SEEN_ATTR, getattr(module, _SEEN_ATTR, 0) + 1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    cap = kwargs.get("softcap") if _APPLIES_CAP.get() else None
    out = quantized_cache_attention(query, key, value, form, scale, True, cap)
    return out.transpose(1, 2).contiguous(), None


@contextmanager
def simulating(model: nn.Module) -> Iterator[None]:
    """Within the block, ``model`` (a Hugging Face model) runs :func:`simulated_attention`, in
    eval mode (no dropout in a replay); its previous attention function and training flags are
    restored afterwards, also on an error."""
    from slimfx.ir.capture import eval_mode

    from .fused import attention_function

    if not hasattr(model, "set_attn_implementation"):
        raise SiteMismatch(f"{type(model).__name__} cannot switch its attention function")
    config = getattr(model, "config", None)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    token = _APPLIES_CAP.set(applies_softcap(getattr(text, "_attn_implementation", None)))
    try:
        with eval_mode(model), attention_function(model, SIMULATED_ATTENTION,
                                                  simulated_attention):  # fmt: skip
            yield
    finally:
        _APPLIES_CAP.reset(token)


def check_replay(model: nn.Module, site: Any, call: BlockCall) -> str | None:
    """Why ``site``'s block cannot be priced by replaying ``call`` (it does not attend as the
    site says: no attention-interface call, keys of another shape, an attention argument the
    simulation lacks, an error its forward raises replayed so), or ``None``. A block that
    fails this is no site for the KV cache: its cache bytes, taken from the site's heads and
    head_dim, would be wrong too."""
    attn = dict(model.named_modules())[site.fqn]
    try:
        with simulating(model):
            replay_block(attn, call, KVDenseConfig(), site.num_kv_heads, site.head_dim)
    except SiteMismatch as e:
        return f"the cache simulation cannot replay {site.module_type or 'this block'}: {e}"
    except (MemoryError, torch.OutOfMemoryError):
        raise  # the machine's limit, not the block's: no reason to drop the site
    except Exception as e:  # noqa: BLE001 — an unknown block failing its replay is refused
        return (
            f"the cache simulation cannot replay {site.module_type or 'this block'}: its "
            f"forward raised {type(e).__name__}: {e}"
        )
    return None


@torch.no_grad()
def replay_block(
    attn: nn.Module, call: BlockCall, form: KVDecision, kv_heads: int, head_dim: int
) -> Tensor:
    """The output of ``attn`` on ``call`` with its cache in ``form`` (inside
    :func:`simulating`); raises :class:`SiteMismatch` when the call never reaches the
    attention function."""
    setattr(attn, _FORM_ATTR, (form, (kv_heads, head_dim)))
    setattr(attn, _SEEN_ATTR, 0)
    try:
        out = attn(*call.args, **call.kwargs)
        if not getattr(attn, _SEEN_ATTR):
            raise SiteMismatch("its forward does not call transformers' attention interface")
    finally:
        delattr(attn, _FORM_ATTR)
        delattr(attn, _SEEN_ATTR)
    return out[0] if isinstance(out, tuple) else out
