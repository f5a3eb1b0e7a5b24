"""Packed CPU kernels for the weight-only quantized linears, in eager PyTorch and torch.compile.

The reference ops (``slimfx::quant_linear``, ``slimfx::quant_lowrank_linear``) dequantize the
whole weight to fp32 on every call, then run ``F.linear``: exact, exportable, and at decode on
a CPU 6–35× slower than the dense layer they replace. This module packs a module's codes once
into the layouts torch's own CPU kernels read, and runs those instead:

- **int4** (group size 32/64/128/256; a per-channel weight through the largest of those that
  divides ``in``, its scale repeated — exact): ``aten._weight_int4pack_mm_for_cpu``, which
  computes ``w = (q − 8)·s + m`` per group, so slimfx's asymmetric ``(q − z)·s`` is
  ``m = (8 − z)·s`` (symmetric: ``z = 8``, ``m = 0``). Needs ``out % 16 == 0``.
- **int8** (per channel or group-wise, symmetric or not): ``aten._weight_int8pack_mm`` over
  the codes shifted to signed (``q − 128``), once per group of columns with that group's
  scales (from ``INT8_GROUPED_GEMM_ROWS`` rows on, a group-wise weight is instead rebuilt as
  codes × scales in the activation dtype for one GEMM); an asymmetric zero point adds
  ``−(Σ_group x)·s·(z − 128)``, one small matmul.

**Activations.** Both kernels are fast with bf16 (or fp16) activations only: with fp32 ones the
same kernels ran 3–6× *slower* than dense fp32 on the AVX-512 box the project measures on. An
fp32 model's activations are therefore rounded to bf16 at the kernel boundary and the output
cast back (``PackedLinear.act_dtype``; ``activations="model"`` keeps fp32). The rounding adds
≈ 3·10⁻³ relative error to a layer's output against the fp32 reference — a tenth of what int4
codes themselves cost (tests measure both).

**Prefill.** The packed kernels also run prefill-sized inputs: with an fp32 model they beat the
dense fp32 GEMM at every row count measured (1–1024 rows, ``benchmarks/cpu_torch.py``). For a
bf16 model they are 2.5–5× *slower* than the dense bf16 GEMM at 256 rows; the alternative —
dequantize into a scratch weight and run one GEMM, ``dequant_rows=`` (off by default) — is
slower still here (≈ 100 ms to dequantize a 4096×4096 int4 weight, inductor-compiled too).

A packed module keeps its canonical codes (saving, export and the graph passes read them) and
adds the packed copy (about the codes' size again); ``torch.export`` always traces the
reference op, so captured graphs and ONNX exports are unchanged. Gradients: a forward that
needs ``x``'s gradient runs the reference op (its autograd).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from slimfx import formats

__all__ = [
    "PackedLinear",
    "INT4_GROUPS",
    "DEFAULT_DEQUANT_ROWS",
    "cpu_kernel_for",
    "act_dtype_for",
    "pack_quant",
    "fast_dequantize",
    "run_packed",
    "packed_linear",
]

#: rows from which a group-wise int8 weight is rebuilt (codes × scales) for one GEMM instead of
#: one ``_weight_int8pack_mm`` call per group (measured 3.8× faster at 256 rows, 1536→576 g128)
INT8_GROUPED_GEMM_ROWS = 32
#: the group sizes ``aten._weight_int4pack_mm_for_cpu`` accepts
INT4_GROUPS = (32, 64, 128, 256)
#: rows (tokens) from which a packed linear dequantizes into a scratch weight and runs one GEMM;
#: ``None``: never — on the AVX-512 box measured, dequantizing a 4096×4096 int4 weight took
#: ≈ 100 ms (even compiled by inductor) against 10 ms for the bf16 GEMM of 256 rows, while the
#: packed kernel beat the dense fp32 GEMM at every row count measured (1–1024)
DEFAULT_DEQUANT_ROWS: int | None = None


def _has(op: str) -> bool:
    return hasattr(torch.ops.aten, op)


def _int4_group(bits_group: int, in_f: int) -> int | None:
    """The int4 kernel's group size for slimfx group size ``bits_group`` (``in_f`` = per
    channel), or ``None`` when no accepted group size fits."""
    if bits_group in INT4_GROUPS:
        return bits_group
    if bits_group == in_f:
        for g in reversed(INT4_GROUPS):
            if in_f % g == 0:
                return g
    return None


def cpu_kernel_for(
    bits: int, group_size: int, in_features: int, out_features: int
) -> tuple[str | None, str]:
    """``(kernel, reason)``: the packed kernel that runs a weight-only quantized linear of this
    layout on the CPU (``"int4pack"`` / ``"int8pack"``), or ``None`` and why the reference op
    (whole-weight dequantization per call) runs instead."""
    if bits == 4:
        if not (_has("_weight_int4pack_mm_for_cpu") and _has("_convert_weight_to_int4pack_for_cpu")):
            return None, "this torch has no aten._weight_int4pack_mm_for_cpu"
        if out_features % 16:
            return None, f"out_features {out_features} is not a multiple of 16 (int4 pack layout)"
        if _int4_group(group_size, in_features) is None:
            return None, (
                f"group size {group_size} is none of {INT4_GROUPS} and no such size divides "
                f"in_features {in_features}"
            )
        return "int4pack", "aten._weight_int4pack_mm_for_cpu reads the packed int4 codes"
    if bits == 8:
        if not _has("_weight_int8pack_mm"):
            return None, "this torch has no aten._weight_int8pack_mm"
        width = group_size if group_size < in_features else in_features  # one call's K
        if width % 16:  # torch 2.13's kernel crashes the process on 24, 70, 72, 147 …
            return None, (  # … and returns garbage at 8: its K must be a multiple of 16
                f"a call's input width {width} (group or in_features) is not a multiple of 16, "
                "which aten._weight_int8pack_mm needs"
            )
        return "int8pack", "aten._weight_int8pack_mm reads the int8 codes (one call per group)"
    return None, f"no packed CPU kernel for {bits}-bit codes"


@dataclass
class PackedLinear:
    """A quantized weight in a torch CPU kernel's layout; ``self(x)`` is ``x @ deq(W)ᵀ`` (no
    bias) in ``x.dtype``. Build with :func:`pack_quant`."""

    kernel: str  # "int4pack" | "int8pack"
    act_dtype: torch.dtype
    in_features: int
    out_features: int
    group_size: int  # the kernel's group size (int4: may differ from the stored one)
    tensors: dict[str, Tensor]
    canonical: tuple[Tensor | None, ...]  # (qweight, scales, zeros) packed from
    versions: tuple[int, ...] = ()
    dequant_rows: int | None = DEFAULT_DEQUANT_ROWS
    bits: int = 4
    stored_group: int = 0
    policy: str = "auto"

    def stale(self, qweight: Tensor, scales: Tensor, zeros: Tensor | None) -> bool:
        """Whether the module's codes changed since packing (replaced or written in place)."""
        now = (qweight, scales, zeros)
        if any(a is not b for a, b in zip(now, self.canonical)):
            return True
        return _versions(now) != self.versions

    def __call__(self, x: Tensor) -> Tensor:
        if self.dequant_rows is not None and x.numel() >= self.dequant_rows * self.in_features:
            w = fast_dequantize(*self.canonical, self.bits, self.stored_group,
                                self.in_features, self.act_dtype)
            return F.linear(x.to(self.act_dtype), w).to(x.dtype)
        return packed_linear(x, self.kernel, *self.kernel_tensors(), self.group_size,
                             self.act_dtype)

    def kernel_tensors(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """The three tensors :func:`run_packed` takes for this kernel."""
        t = self.tensors
        if self.kernel == "int4pack":
            return t["packed"], t["sz"], None
        return t["q"], t["s"], t.get("corr")


def run_packed(
    x2: Tensor, kernel: str, a: Tensor, b: Tensor, corr: Tensor | None, group_size: int
) -> Tensor:
    """``x2 @ deq(W)ᵀ`` for 2-D ``x2`` already in the kernel's activation dtype: ``int4pack``
    (``a`` the packed codes, ``b`` the (groups, out, 2) scales and offsets) or ``int8pack``
    (``a`` (groups, out, G) int8 codes, ``b`` (groups, out) scales, ``corr`` the zero-point
    term or ``None``). A plain function of tensors, so graphs can call it (compile backend)."""
    k_in = a.shape[1] * 2 if kernel == "int4pack" else a.shape[0] * a.shape[2]
    if x2.shape[-1] != k_in:
        # the int8 path slices x by group and would read a wrong-width input silently
        raise RuntimeError(
            f"packed {kernel} linear takes {k_in} input features, got an input of width "
            f"{x2.shape[-1]}"
        )
    if kernel == "int4pack":
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), a, group_size, b)
    G, ng = group_size, a.shape[0]
    if ng > 1 and x2.shape[0] >= INT8_GROUPED_GEMM_ROWS:
        # many rows: one call per group loses to rebuilding the weight (codes × group scales,
        # in the activation dtype) and one GEMM — 1536→576 g128 at 256 rows: 3.4 → 0.9 ms
        w = (a.to(x2.dtype) * b.unsqueeze(-1)).transpose(0, 1).reshape(a.shape[1], ng * G)
        y = F.linear(x2, w)
    else:
        y = torch.ops.aten._weight_int8pack_mm(x2[:, :G].contiguous(), a[0], b[0])
        for g in range(1, ng):
            y = y + torch.ops.aten._weight_int8pack_mm(
                x2[:, g * G:(g + 1) * G].contiguous(), a[g], b[g]
            )
    if corr is not None:  # (ng, out) fp32: s·(z − 128)
        sums = x2.float().reshape(x2.shape[0], ng, G).sum(-1)
        y = (y.float() - sums @ corr).to(y.dtype)
    return y


def packed_linear(
    x: Tensor, kernel: str, a: Tensor, b: Tensor, corr: Tensor | None, group_size: int,
    act_dtype: torch.dtype, bias: Tensor | None = None,
) -> Tensor:
    """``x @ deq(W)ᵀ + bias`` for any leading dims of ``x``, activations rounded to
    ``act_dtype`` at the kernel and the output back in ``x.dtype`` (what a packed module
    computes; the compile backend's graphs call it)."""
    k = x.shape[-1]
    y = run_packed(x.reshape(-1, k).to(act_dtype), kernel, a, b, corr, group_size)
    y = y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)
    return y if bias is None else y + bias.to(y.dtype)


def _versions(ts: tuple[Tensor | None, ...]) -> tuple[int, ...]:
    out: list[int] = []
    for t in ts:
        out += (-1, -1) if t is None else (t._version, t.data_ptr())
    return tuple(out)


def act_dtype_for(model_dtype: torch.dtype, policy: str = "auto") -> torch.dtype:
    """The activation dtype at the kernel boundary: ``"auto"`` runs fp32 (and fp64) models'
    kernels in bf16 and half-precision models in their own dtype; ``"model"`` keeps the model's
    dtype; ``"bf16"`` forces bf16."""
    if policy == "model":
        return model_dtype
    if policy == "bf16":
        return torch.bfloat16
    if policy != "auto":
        raise ValueError(f"activation policy must be 'auto', 'model' or 'bf16', got {policy!r}")
    return model_dtype if model_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


@torch.no_grad()
def pack_quant(
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    *,
    activations: str = "auto",
    dequant_rows: int | None = DEFAULT_DEQUANT_ROWS,
) -> PackedLinear:
    """Pack stored codes (``slimfx.formats``) for their CPU kernel, activations at the kernel
    boundary per ``activations`` (:func:`act_dtype_for` of the scales' dtype); ``ValueError``
    (with :func:`cpu_kernel_for`'s reason) when no kernel takes the layout."""
    out_f = qweight.shape[0]
    kernel, why = cpu_kernel_for(bits, group_size, in_features, out_f)
    if kernel is None:
        raise ValueError(why)
    s32 = scales.to(torch.float32)
    z = None if zeros is None else zeros.to(torch.float32)
    act_dtype = act_dtype_for(scales.dtype, activations)
    common = dict(
        act_dtype=act_dtype, policy=activations, in_features=in_features, out_features=out_f,
        canonical=(qweight, scales, zeros), versions=_versions((qweight, scales, zeros)),
        dequant_rows=dequant_rows, bits=bits, stored_group=group_size,
    )
    if kernel == "int4pack":
        g = _int4_group(group_size, in_features)
        assert g is not None
        rep = group_size // g  # per-channel: one stored group spans rep kernel groups
        codes = formats.unpack_codes(qweight, 4, in_features).to(torch.int32).contiguous()
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        zz = torch.full_like(s32, 8.0) if z is None else z
        sz = torch.stack([s32, (8.0 - zz) * s32], dim=-1)  # (out, n_groups, 2)
        sz = sz.repeat_interleave(rep, dim=1).transpose(0, 1).contiguous().to(act_dtype)
        return PackedLinear("int4pack", group_size=g, tensors={"packed": packed, "sz": sz},
                            **common)
    ng = s32.shape[1]
    G = in_features // ng
    signed = (qweight.to(torch.int16) - 128).to(torch.int8)
    q = signed.reshape(out_f, ng, G).transpose(0, 1).contiguous()  # (ng, out, G)
    tensors = {"q": q, "s": s32.t().contiguous().to(act_dtype)}
    if z is not None:
        tensors["corr"] = (s32 * (z - 128.0)).t().contiguous()
    return PackedLinear("int8pack", group_size=G, tensors=tensors, **common)


def fast_dequantize(
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype,
) -> Tensor:
    """``(q − z)·s`` as an ``out × in`` tensor of ``dtype`` computed in that dtype (the codes
    and ``q − z`` are exact in bf16; one rounding per product) — the prefill scratch."""
    out_f = qweight.shape[0]
    codes = formats.unpack_codes(qweight, bits, in_features)
    ng = scales.shape[1]
    w = codes.to(dtype).reshape(out_f, ng, -1)
    w = w - (torch.full((1,), formats.symmetric_offset(bits), dtype=dtype) if zeros is None
             else zeros.to(dtype).unsqueeze(-1))
    return (w * scales.to(dtype).unsqueeze(-1)).reshape(out_f, in_features)
