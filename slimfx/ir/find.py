"""Site finders: with ``ir.graph_linear`` (the forms a linear takes in an exported graph, and
what its module may compute beyond it), the only pattern-recognition code in slimfx.

Linear sites come from the exported graph when there is one (``graph_linear.match_linear``:
``linear``, decomposed ``mm`` / ``addmm``, GPT-2's ``Conv1D`` ``addmm``, ``x @ W.T`` in an
``nn.Linear`` subclass),
one site per module (a module called twice gives one site, at its first call), in graph order.
Linears reading the same graph node (looking through the views a decomposition adds) share a
``group`` named after the first member: q/k/v share one input Gram matrix, gate/up another.
When capture fell back to the module tree, ``discover_linear_sites`` walks ``nn.Linear`` (and
``Conv1D``) modules instead and groups them by running the model once with forward-pre-hooks.

Attention sites are module-level metadata (heads, kv-heads, head_dim, causality, rotary dims,
window, layer index, projections); ``site.site_shape`` is their ``AttentionShape``.
``find_attention_sites`` reads any block with q/k/v/o children and head counts;
``describe_attention`` / ``inspect_attention_sites`` are the one introspection of Hugging Face
decoder attention the attention forms use (KV cache, MLA): sites with a cache layer, the
reason for every attention-like module that is not one, and the variants a form may refuse.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from slimfx.ir.capture import Captured, eval_mode
from slimfx.ir.graph_linear import (
    adds_own_bias,
    graph_weight_readers,
    match_linear,
    wider_than_linear,
)
from slimfx.ir.match import is_conv1d, is_linear_module, linear_weight, weight_owner
from slimfx.ir.modules import SlimLinear
from slimfx.ir.sites import AttentionSite, LinearSite

__all__ = [
    "find_linear_sites",
    "discover_linear_sites",
    "wider_than_linear",  # from ir.graph_linear, re-exported
    "graph_weight_readers",
    "find_attention_sites",
    "describe_attention",
    "describe_cache_attention",
    "logit_softcap",
    "unbound_window",
    "inspect_attention_sites",
    "attention_variant_reasons",
    "ATTENTION_VARIANTS",
    "MHA_REASON",
]



# --------------------------------------------------------------------------- shared helpers


def _tied_names(model: nn.Module, weight: torch.Tensor, own: str) -> tuple[str, ...]:
    """Other parameter FQNs that are the very same tensor object as ``weight``."""
    return tuple(
        name
        for name, p in model.named_parameters(remove_duplicate=False)
        if p is weight and name != own
    )


def _make_site(
    model: nn.Module,
    fqn: str,
    module: nn.Module,
    has_bias: bool,
    group: str,
    node: str | None,
) -> LinearSite:
    out_f, in_f = linear_weight(module).shape
    own = f"{fqn}.weight" if fqn else "weight"
    return LinearSite(
        fqn=fqn,
        in_features=int(in_f),
        out_features=int(out_f),
        dtype=str(module.weight.dtype),
        has_bias=has_bias,
        weight=own,
        group=group,
        tied=_tied_names(model, module.weight, own),
        node=node,
    )


def _has_2d_weight(module: nn.Module | None) -> bool:
    w = getattr(module, "weight", None)
    return isinstance(w, torch.Tensor) and w.dim() == 2


def _assign_groups(order: list[str], key_of: dict[str, Any]) -> dict[str, str]:
    """fqn → group name: members with the same key are named after the first in ``order``."""
    first: dict[Any, str] = {}
    groups: dict[str, str] = {}
    for fqn in order:
        key = key_of.get(fqn)
        if key is None:
            groups[fqn] = fqn
            continue
        groups[fqn] = first.setdefault(key, fqn)
    return groups


# --------------------------------------------------------------------------- graph sites


def find_linear_sites(captured: Captured, model: nn.Module) -> list[LinearSite]:
    """Every linear layer of ``model`` with a parameter weight, one site per module, graph order.

    With ``captured.method == "module"`` (export failed) this is
    ``discover_linear_sites(model, captured.example_args, captured.example_kwargs)``.
    """
    if captured.method == "module" or captured.program is None:
        return discover_linear_sites(model, captured.example_args, captured.example_kwargs)
    program = captured.program
    params = dict(program.graph_signature.inputs_to_parameters)
    named = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules())

    order: list[str] = []
    found: dict[str, tuple[str, bool, Any]] = {}  # fqn → (node name, has_bias, input key)
    for node in program.graph.nodes:
        match = match_linear(node, params)
        if match is None:
            continue
        weight_fqn, key, has_bias, in_out = match
        weight = named.get(weight_fqn)
        if weight is None:
            raise ValueError(
                f"graph parameter {weight_fqn!r} is not a parameter of {type(model).__name__}: "
                "was the program captured from this model?"
            )
        aliases = [n for n, p in model.named_parameters(remove_duplicate=False) if p is weight]
        fqn = weight_owner(modules, node, weight, (weight_fqn, *aliases))
        if fqn is None or fqn in found or in_out != is_conv1d(modules[fqn]):
            continue
        if has_bias is None and not isinstance(modules[fqn], nn.Linear):
            continue  # x @ W.T is a linear only in a Linear subclass
        if not has_bias:  # F.linear(x, W) / x @ W.T, then `+ self.bias` in the same module
            has_bias = adds_own_bias(program, params, fqn)
        found[fqn] = (node.name, has_bias, key)
        order.append(fqn)

    groups = _assign_groups(order, {fqn: found[fqn][2] for fqn in order})
    return [
        _make_site(model, fqn, modules[fqn], found[fqn][1], groups[fqn], found[fqn][0])
        for fqn in order
    ]


# --------------------------------------------------------------------------- module sites


def discover_linear_sites(
    model: nn.Module,
    example_args: tuple[Any, ...] = (),
    example_kwargs: dict[str, Any] | None = None,
) -> list[LinearSite]:
    """Linear sites from the module tree: every ``nn.Linear`` (or ``Conv1D``) of ``model``
    (``node=None``).

    Without example inputs each linear is its own group, in ``named_modules`` order. With
    example inputs the model runs once (eval mode, no grad; hooks removed and training flags
    restored afterwards); linears whose first call receives the very same input tensor object
    share a group, sites come in call order, and linears that were never called are left out.
    """
    modules = dict(model.named_modules())
    linears = [(fqn, m) for fqn, m in modules.items() if is_linear_module(m)]
    if not example_args and not example_kwargs:
        return [_make_site(model, fqn, m, m.bias is not None, fqn, None) for fqn, m in linears]

    calls: list[str] = []
    inputs: dict[str, torch.Tensor] = {}  # keeps inputs alive so their ids stay unique

    def hook_for(fqn: str):  # noqa: ANN202
        def hook(_mod: nn.Module, args: tuple[Any, ...]) -> None:
            if fqn not in inputs and args and isinstance(args[0], torch.Tensor):
                inputs[fqn] = args[0]
                calls.append(fqn)

        return hook

    handles = [m.register_forward_pre_hook(hook_for(fqn)) for fqn, m in linears]
    try:
        with eval_mode(model), torch.no_grad():
            model(*example_args, **(example_kwargs or {}))
    finally:
        for h in handles:
            h.remove()

    groups = _assign_groups(calls, {fqn: id(inputs[fqn]) for fqn in calls})
    sites = [
        _make_site(model, fqn, modules[fqn], modules[fqn].bias is not None, groups[fqn], None)
        for fqn in calls
    ]
    inputs.clear()
    return sites


# --------------------------------------------------------------------------- attention sites

_CAUSAL_MODEL_TYPES = {
    "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi",
    "phi3", "gpt2", "gpt_neox", "gptj", "opt", "falcon", "olmo", "olmo2", "smollm3", "granite",
    "starcoder2", "stablelm", "cohere", "deepseek_v3",
}  # fmt: skip


def _first_int(objs: Iterable[Any], *names: str) -> int | None:
    for obj in objs:
        for name in names:
            v = getattr(obj, name, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def _is_causal(module: nn.Module, config: Any) -> bool:
    flag = getattr(module, "is_causal", None)
    if isinstance(flag, bool):
        return flag
    if config is None:
        return False
    if getattr(config, "is_decoder", False):
        return True
    if getattr(config, "model_type", None) in _CAUSAL_MODEL_TYPES:
        return True
    archs = getattr(config, "architectures", None) or ()
    return any(str(a).endswith("ForCausalLM") for a in archs)


def _rope_dim(config: Any, head_dim: int, layer_idx: int | None = None) -> int:
    """Dims per head carrying rotary position: all of them for a config with a ``rope_theta``
    (an attribute, or in ``rope_parameters``), times ``partial_rotary_factor`` when set and
    kept even; none without, nor on a layer ``config.no_rope_layers`` marks as NoPE."""
    if config is None:
        return 0
    no_rope = getattr(config, "no_rope_layers", None)
    if no_rope is not None and layer_idx is not None and layer_idx < len(no_rope):
        if not no_rope[layer_idx]:
            return 0
    params = getattr(config, "rope_parameters", None)
    params = params if isinstance(params, dict) else {}
    if params and all(isinstance(v, dict) for v in params.values()):  # per layer type (Gemma 3)
        types = getattr(config, "layer_types", None) or ()
        kind = types[layer_idx] if layer_idx is not None and layer_idx < len(types) else None
        params = params.get(kind) or next(iter(params.values()))
    if getattr(config, "rope_theta", None) is None and params.get("rope_theta") is None:
        return 0
    factor = getattr(config, "partial_rotary_factor", None) or params.get("partial_rotary_factor")
    factor = factor or 1.0
    return min(head_dim, int(head_dim * float(factor)) // 2 * 2)


def find_attention_sites(model: nn.Module) -> list[AttentionSite]:
    """Attention blocks with ``q_proj``/``k_proj``/``v_proj``/``o_proj`` children.

    Heads, kv-heads and head_dim come from the module's ``config`` (or the model's), then
    from the module's own attributes: ``num_attention_heads`` / ``num_heads``,
    ``num_key_value_heads`` (defaults to heads), ``head_dim`` (defaults to hidden / heads).
    Causality: the module's ``is_causal``, else ``config.is_decoder`` or a decoder model type.
    """
    root_config = getattr(model, "config", None)
    sites: list[AttentionSite] = []
    for fqn, module in model.named_modules():
        projs = {r: getattr(module, f"{r}_proj", None) for r in ("q", "k", "v", "o")}
        if not all(isinstance(p, nn.Module) for p in projs.values()):
            continue
        config = getattr(module, "config", None)
        config = root_config if config is None else config
        sources = [c for c in (config, module) if c is not None]
        heads = _first_int(sources, "num_attention_heads", "num_heads", "n_head")
        if heads is None:
            continue
        kv = _first_int(sources, "num_key_value_heads", "num_kv_heads") or heads
        hidden = _first_int(sources, "hidden_size", "embed_dim", "d_model")
        head_dim = _first_int(sources, "head_dim") or (hidden // heads if hidden else None)
        if head_dim is None:
            continue
        prefix = f"{fqn}." if fqn else ""
        layer = getattr(module, "layer_idx", None)
        layer = layer if isinstance(layer, int) and not isinstance(layer, bool) else None
        sites.append(
            AttentionSite(
                fqn=fqn,
                num_heads=heads,
                num_kv_heads=kv,
                head_dim=head_dim,
                causal=_is_causal(module, config),
                projections=tuple((r, f"{prefix}{r}_proj") for r in projs),
                hidden_size=hidden,
                rope_dim=_rope_dim(config, head_dim, layer),
                sliding_window=_sliding_window(module, config, layer),
                layer_idx=layer,
            )
        )
    return sites


# ------------------------------------------------- Hugging Face attention blocks (module level)

MHA_REASON = (
    "nn.MultiheadAttention keeps no KV cache between calls (no layer index, no position "
    "encoding, q/k/v fused in in_proj_weight): there is no cache to compress"
)
_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")
#: per-head (or per-width) q/k norm attributes, the keys' first (the site names the first found)
_QK_NORMS = ("k_norm", "k_layernorm", "key_layernorm", "q_norm", "q_layernorm", "query_layernorm")

#: the attention variants a form may refuse, named for ``attention_variant_reasons``.
ATTENTION_VARIANTS = ("no_rope", "partial_rotary", "qk_norm", "sliding_window", "softcap")


def logit_softcap(module: nn.Module, config: Any = None) -> float | None:
    """The attention-logit soft-cap of a Hugging Face block (Gemma 2's
    ``attn_logit_softcapping``: the module's, else its config's), ``None`` without one."""
    config = getattr(module, "config", None) if config is None else config
    for obj in (module, config):
        cap = getattr(obj, "attn_logit_softcapping", None)
        if isinstance(cap, (int, float)) and not isinstance(cap, bool) and cap > 0:
            return float(cap)
    return None


def _sliding_window(module: nn.Module, config: Any, layer_idx: int | None) -> int | None:
    """The window that binds: :func:`_raw_sliding_window`, unless it reaches
    ``max_position_embeddings`` (Phi-3-128k's 262144 against 131072 positions), where every
    token the model was made for is in the window — full attention (:func:`unbound_window`)."""
    win = _raw_sliding_window(module, config, layer_idx)
    return None if win is not None and _never_binds(win, config) else win


def _never_binds(window: int, config: Any) -> bool:
    longest = getattr(config, "max_position_embeddings", None) if config is not None else None
    return isinstance(longest, int) and not isinstance(longest, bool) and window >= longest


def unbound_window(config: Any) -> int | None:
    """The config's ``sliding_window`` where it reaches ``max_position_embeddings`` (so no
    layer's window ever drops a token within the model's positions); else ``None``. Such
    layers are full-attention sites, and transformers' sliding cache layers built for them
    may be replaced by a full compressed layer (``forms.kv.apply.upgrade_cache_layer``)."""
    win = getattr(config, "sliding_window", None) if config is not None else None
    ok = isinstance(win, int) and not isinstance(win, bool) and win > 0
    return win if ok and _never_binds(win, config) else None


def _raw_sliding_window(module: nn.Module, config: Any, layer_idx: int | None) -> int | None:
    """The module's ``sliding_window``; else the config's, on a layer ``layer_types`` marks
    ``"sliding_attention"`` (without ``layer_types``: when ``use_sliding_window`` is not off)."""
    win = getattr(module, "sliding_window", None)
    if isinstance(win, int) and not isinstance(win, bool) and win > 0:
        return win
    cfg_win = getattr(config, "sliding_window", None) if config is not None else None
    if not isinstance(cfg_win, int) or isinstance(cfg_win, bool) or cfg_win <= 0:
        return None
    types = getattr(config, "layer_types", None)
    if types is not None:
        sliding = layer_idx is not None and layer_idx < len(types)
        return cfg_win if sliding and types[layer_idx] == "sliding_attention" else None
    return cfg_win if getattr(config, "use_sliding_window", True) else None


def _projection(module: nn.Module, name: str, rewritten: tuple[str, ...]) -> bool:
    """Whether ``module.name`` is a usable projection: an ``nn.Linear``, or, for a name in
    ``rewritten``, a linear a form rewrote (``slimfx.ir.modules.SlimLinear``: what a reader of
    its dense equivalent can rebuild)."""
    p = getattr(module, name, None)
    return isinstance(p, nn.Linear) or (name in rewritten and isinstance(p, SlimLinear))


def describe_attention(
    module: nn.Module, fqn: str = "", config: Any = None, layer_idx: int | None = None,
    rewritten: tuple[str, ...] = (),
) -> AttentionSite | str:
    """The :class:`AttentionSite` of one Hugging Face decoder attention block, or why not.

    A block is a site when it has ``q_proj``/``k_proj``/``v_proj``/``o_proj`` ``nn.Linear``
    children, a ``head_dim`` (the module's, else the config's) and a layer index (the
    ``layer_idx`` given, else the module's): Llama, Mistral, Qwen2/3, Gemma, SmolLM, …. Heads
    come from the projection widths (a pruned model reads right), RoPE from ``config`` (the
    module's when not given; ``partial_rotary_factor``, ``no_rope_layers``), the window as in
    ``_sliding_window``. Variants a form may refuse (no RoPE, partial rotary, a q/k norm, a
    window) are recorded on the site; :func:`attention_variant_reasons` words them.
    ``rewritten``: projections that may already be rewritten linears (MLA reads ``q_proj`` /
    ``o_proj`` only through their forward and dense-equivalent weight).
    """
    if isinstance(module, nn.MultiheadAttention):
        return MHA_REASON
    name = type(module).__name__
    missing = [p for p in _PROJS if not _projection(module, p, rewritten)]
    if missing:
        return (
            f"unsupported attention variant {name}: no nn.Linear {', '.join(missing)} "
            "(fused or missing projections, or already rewritten)"
        )
    config = getattr(module, "config", None) if config is None else config
    layer_idx = getattr(module, "layer_idx", None) if layer_idx is None else layer_idx
    if not isinstance(layer_idx, int) or isinstance(layer_idx, bool):
        return "no layer_idx: not a decoder attention with a cache layer"
    q, k, v, _ = (getattr(module, p) for p in _PROJS)
    head_dim = _first_int([module] + ([config] if config is not None else []), "head_dim")
    if head_dim is None:
        return f"unsupported attention variant {name}: no integer head_dim"
    if k.out_features != v.out_features:
        return f"k_proj ({k.out_features}) and v_proj ({v.out_features}) widths differ"
    if q.out_features % head_dim or k.out_features % head_dim:
        return f"projection widths are not multiples of head_dim {head_dim}"
    heads, kv_heads = q.out_features // head_dim, k.out_features // head_dim
    if heads % kv_heads:
        return f"{heads} query heads are not a multiple of {kv_heads} key/value heads"
    prefix = f"{fqn}." if fqn else ""
    norm = next((n for n in _QK_NORMS if getattr(module, n, None) is not None), None)
    return AttentionSite(
        fqn=fqn,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        causal=_is_causal(module, config),
        projections=tuple((p[0], f"{prefix}{p}") for p in _PROJS),
        hidden_size=q.in_features,
        rope_dim=_rope_dim(config, head_dim, layer_idx),
        sliding_window=_sliding_window(module, config, layer_idx),
        layer_idx=layer_idx,
        module_type=name,
        qk_norm=norm,
        softcap=logit_softcap(module, config),
    )


#: the output projection's attribute in blocks without an ``o_proj`` (Phi, GPT-NeoX: ``dense``;
#: OPT: ``out_proj``; GPT-2: ``c_proj``)
_OUT_PROJS = ("o_proj", "dense", "out_proj", "c_proj")


def describe_cache_attention(
    module: nn.Module, fqn: str = "", config: Any = None, causal: bool | None = None
) -> AttentionSite | str:
    """A *cache-only* site (``AttentionSite.cache_only``) for a Hugging Face decoder attention
    block that :func:`describe_attention` refuses for its projections, or why not: a module
    named ``…Attention`` with a layer index whose ``forward`` takes ``past_key_values`` or
    ``layer_past`` (the transformers ``Cache`` whose layer a quantized form replaces) — Phi-3
    (fused ``qkv_proj``), Phi, OPT, GPT-2, GPT-NeoX. Heads, kv-heads and head_dim come from
    the module, then ``config`` (the module's when not given); ``causal``: known from the
    model (a ``…ForCausalLM``), else read as :func:`find_attention_sites` does; whether the
    block really calls
    transformers' attention interface with keys of that shape is checked on calibration text
    before it is priced (``forms.kv.replay.check_replay``)."""
    import inspect

    name = type(module).__name__
    config = getattr(module, "config", None) if config is None else config
    layer_idx = getattr(module, "layer_idx", None)
    if not isinstance(layer_idx, int) or isinstance(layer_idx, bool):
        return "no layer_idx: not a decoder attention with a cache layer"
    if not (causal if causal is not None else _is_causal(module, config)):
        return f"{name} is not causal (an encoder's attention): it keeps no KV cache"
    params = inspect.signature(module.forward).parameters
    if not any(p in params for p in ("past_key_values", "layer_past")):
        return (
            f"unsupported attention variant {name}: its forward takes no past_key_values / "
            "layer_past (the transformers Cache whose layer a KV form replaces)"
        )
    sources = [module] + ([config] if config is not None else [])
    heads = _first_int(sources, "num_heads", "num_attention_heads", "n_head")
    if heads is None:
        return f"unsupported attention variant {name}: no head count"
    kv = _first_int(sources, "num_key_value_heads", "num_kv_heads") or heads
    hidden = _first_int(sources, "hidden_size", "embed_dim", "d_model")
    head_dim = _first_int(sources, "head_dim", "head_size") or (hidden // heads if hidden else None)
    if head_dim is None:
        return f"unsupported attention variant {name}: no head_dim"
    if heads % kv:
        return f"{heads} query heads are not a multiple of {kv} key/value heads"
    prefix = f"{fqn}." if fqn else ""
    roles = {r: f"{r}_proj" for r in "qkv"}
    projs = [(r, f"{prefix}{a}") for r, a in roles.items()
             if isinstance(getattr(module, a, None), nn.Linear)]  # fmt: skip
    out = next((a for a in _OUT_PROJS if isinstance(getattr(module, a, None), nn.Module)), None)
    if out is not None:
        projs.append(("o", f"{prefix}{out}"))
    return AttentionSite(
        fqn=fqn,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        causal=True,
        projections=tuple(projs),
        hidden_size=hidden,
        rope_dim=_rope_dim(config, head_dim, layer_idx),
        sliding_window=_sliding_window(module, config, layer_idx),
        layer_idx=layer_idx,
        module_type=name,
        cache_only=(
            f"{name} has no separate q_proj/k_proj/v_proj/o_proj linears (fused or renamed "
            "projections)"
        ),
        softcap=logit_softcap(module, config),
    )


def attention_variant_reasons(site: AttentionSite) -> dict[str, str]:
    """Variant name (``ATTENTION_VARIANTS``) → reason, for each variant ``site`` has."""
    name = site.module_type or "attention"
    out: dict[str, str] = {}
    if site.rope_dim == 0:
        out["no_rope"] = "no RoPE found: a NoPE block has no rotary dims to keep apart"
    elif site.rope_dim != site.head_dim:
        out["partial_rotary"] = (
            f"unsupported attention variant {name}: RoPE on {site.rope_dim} of "
            f"{site.head_dim} head dims (partial rotary) is not handled"
        )
    if site.qk_norm is not None:
        out["qk_norm"] = (
            f"unsupported attention variant {name}: per-head {site.qk_norm} sits between the "
            "projection and RoPE, so keys are not linear in the hidden state"
        )
    if site.sliding_window is not None:
        out["sliding_window"] = (
            f"sliding-window attention (window {site.sliding_window}) is unsupported"
        )
    if site.softcap is not None:
        out["softcap"] = (
            f"unsupported attention variant {name}: attention logits soft-capped at "
            f"{site.softcap:g}, which the rewritten block's attention does not apply"
        )
    return out


def inspect_attention_sites(
    model: nn.Module, refuse: Iterable[str] = ()
) -> tuple[list[AttentionSite], dict[str, str]]:
    """``(sites, rejected)``: the Hugging Face attention sites of ``model`` in module order
    (:func:`describe_attention`) and, for each attention-like module that is not one, the
    reason by fqn: ``nn.MultiheadAttention``, blocks with q/k/v/o attributes that
    ``describe_attention`` refuses, and sites with a variant named in ``refuse``
    (``ATTENTION_VARIANTS``; the first such reason)."""
    refuse = set(refuse)
    unknown = refuse - set(ATTENTION_VARIANTS)
    if unknown:
        raise ValueError(f"unknown attention variants {sorted(unknown)}; {ATTENTION_VARIANTS}")
    sites: list[AttentionSite] = []
    rejected: dict[str, str] = {}
    root = getattr(model, "config", None)
    lm = type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")) or None
    for fqn, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention) or all(hasattr(m, p) for p in _PROJS):
            got = describe_attention(m, fqn)
        elif type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx"):
            got = describe_cache_attention(m, fqn, getattr(m, "config", None) or root, lm)
        else:
            continue
        if not isinstance(got, str) and getattr(root, "is_encoder_decoder", False):
            got = (
                f"{type(m).__name__} is in an encoder-decoder model, whose generate() keeps an "
                "EncoderDecoderCache (self- and cross-attention caches): the KV forms hold the "
                "layers of a decoder-only cache"
            )
        if isinstance(got, str):
            rejected[fqn] = got
            continue
        why = [r for v, r in attention_variant_reasons(got).items() if v in refuse]
        if why:
            rejected[fqn] = why[0]
        else:
            sites.append(got)
    return sites, rejected
