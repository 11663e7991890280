"""``evit::relu_linear_attention``: LiteMLA's ReLU linear attention over the qkv map and its multi-scale
aggregations (docs/ops.md, "ReLU linear attention"), with an explicit backward; and
``evit::relu_linear_attention_aggregated``, the same attention taking the aggregation weights instead of the
aggregated maps (docs/ops.md, "Multi-scale aggregation and the aggregated form"), so that a kernel can compute
the aggregated q, k, v on the fly (inference).

Per (batch, head) with q = relu(q), k = relu(k), v as is, over the N = H·W tokens:
``kv = Σ_n k_n v_nᵀ`` (d×d), ``z = Σ_n k_n`` (d), ``out_n = kvᵀ q_n / (z·q_n + eps)``.
kv, z and the division are computed in fp32 (fp64 for fp64 inputs) whatever the input dtype: in fp16 the sums
over N overflow 65504 and mit-han-lab's eps 1e-15 rounds to 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from evit_kernels import dispatch
from evit_kernels.ops._library import OpArgs, autocast_off, define_op
from evit_kernels.ops.multiscale_aggregation import MultiscaleAggregationArgs, multiscale_aggregation_reference
from evit_kernels.ops.multiscale_aggregation import _check_shapes as _check_aggregation_shapes


@dataclass(frozen=True)
class ReluLinearAttentionArgs(OpArgs):
    """The arguments of ``evit::relu_linear_attention`` (see :func:`relu_linear_attention`)."""

    op: ClassVar[str] = "relu_linear_attention"
    qkv: Tensor
    aggregated: list[Tensor]
    dim: int
    eps: float

    def output_shape(self) -> list[int]:
        batch, channels, height, width = self.qkv.shape
        return [batch, (1 + len(self.aggregated)) * (channels // 3), height, width]


def relu_linear_attention_reference(a: ReluLinearAttentionArgs) -> Tensor:
    """Eager PyTorch forward: (B, (1+S)·TD, H, W) in ``qkv``'s dtype, channel ``g·dim + i`` where the heads g
    run over ``qkv`` first, then over each tensor of ``aggregated``. Each group is written into its slice of
    the output; the groups are never concatenated."""
    qkv, aggregated, dim, eps = a.fields()
    batch, channels, height, width = qkv.shape
    heads = channels // (3 * dim)
    groups = [qkv, *aggregated]
    out = qkv.new_empty(batch, len(groups) * heads * dim, height, width)
    out_by_group = out.view(batch, len(groups), heads, dim, height * width)
    # Custom ops are invisible to autocast but the ops inside them are not: keep the fp32 matmuls in fp32.
    with autocast_off(qkv):
        for index, group in enumerate(groups):
            q, k, v, _, _ = _relu_qkv(group, dim)
            kv, z = _kv_and_z(k, v)
            num, den = _numerator_and_denominator(q, kv, z, eps)
            out_by_group[:, index].copy_(num / den)
    return out


def relu_linear_attention_backward_reference(a: ReluLinearAttentionArgs, grad_out: Tensor) -> dict[str, Any]:
    """Gradients for ``qkv`` and for each tensor of ``aggregated`` (by field name), recomputing kv and z per
    (batch, head).

    With ``g = grad_out``, ``den_n = z·q_n + eps`` and ``out_n = kvᵀ q_n / den_n``:
    ``gnum_n = g_n / den_n``, ``gden_n = -gnum_n·out_n``;
    ``dq_n = kv gnum_n + z gden_n``, ``dkv = Σ_n q_n gnum_nᵀ``, ``dz = Σ_n q_n gden_n``;
    ``dk_n = dkv v_n + dz``, ``dv_n = dkvᵀ k_n``; dq and dk pass the ReLU only where its input is > 0.
    ``grad_out`` may have any strides (a stride-0 one from ``y.sum().backward()`` included).
    """
    qkv, aggregated, dim, eps = a.fields()
    batch, channels, height, width = qkv.shape
    heads = channels // (3 * dim)
    groups = [qkv, *aggregated]
    grad_by_group = grad_out.reshape(batch, len(groups), heads, dim, height * width)
    grads = []
    with autocast_off(qkv):
        for index, group in enumerate(groups):
            q, k, v, q_passes, k_passes = _relu_qkv(group, dim)
            kv, z = _kv_and_z(k, v)
            num, den = _numerator_and_denominator(q, kv, z, eps)
            grad_num = grad_by_group[:, index].to(q.dtype) / den
            grad_den = -(grad_num * (num / den)).sum(dim=-2, keepdim=True)
            grad_q = (kv @ grad_num + z.unsqueeze(-1) * grad_den) * q_passes
            grad_kv = q @ grad_num.transpose(-1, -2)
            grad_z = (q * grad_den).sum(dim=-1, keepdim=True)
            grad_k = (grad_kv @ v + grad_z) * k_passes
            grad_v = grad_kv.transpose(-1, -2) @ k
            grad = torch.cat([grad_q, grad_k, grad_v], dim=2).to(group.dtype)
            grads.append(grad.reshape(group.shape))
    return {"qkv": grads[0], "aggregated": grads[1:]}


def _relu_qkv(group: Tensor, dim: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """q, k, v of each head of ``group`` (B, heads·3·dim, H, W) as (B, heads, dim, N) in the accumulation dtype,
    q and k through the ReLU, plus the ReLU's pass masks for q and k."""
    batch, channels = group.shape[:2]
    per_head = group.reshape(batch, channels // (3 * dim), 3 * dim, -1)
    q, k, v = per_head.to(torch.promote_types(group.dtype, torch.float32)).split(dim, dim=2)
    return torch.relu(q), torch.relu(k), v, q > 0, k > 0


def _kv_and_z(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``kv[i, j] = Σ_n k[i, n] v[j, n]`` (B, heads, d, d) and ``z = Σ_n k[:, n]`` (B, heads, d)."""
    return k @ v.transpose(-1, -2), k.sum(dim=-1)


def _numerator_and_denominator(q: Tensor, kv: Tensor, z: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``kvᵀ q_n`` (B, heads, d, N) and ``z·q_n + eps`` (B, heads, 1, N)."""
    return kv.transpose(-1, -2) @ q, z.unsqueeze(-2) @ q + eps


define_op(ReluLinearAttentionArgs, relu_linear_attention_reference, relu_linear_attention_backward_reference)


def _triton_forward(a: ReluLinearAttentionArgs) -> Tensor:
    from evit_kernels.triton import relu_linear_attention as kernels

    return kernels.forward([a.qkv, *a.aggregated], a.dim, a.eps)


def _triton_backward(a: ReluLinearAttentionArgs, grad_out: Tensor) -> dict[str, Any]:
    from evit_kernels.triton import relu_linear_attention as kernels

    grad_qkv, *grad_aggregated = kernels.backward([a.qkv, *a.aggregated], grad_out, a.dim, a.eps)
    return {"qkv": grad_qkv, "aggregated": grad_aggregated}


def _triton_reasons(a: ReluLinearAttentionArgs) -> list[str]:
    return _head_reasons(a.qkv, a.aggregated, a.dim)


def _head_reasons(qkv: Tensor, aggregated: list[Tensor], dim: int) -> list[str]:
    """What the Triton kernels of both ops refuse in the head layout: the head dim, and (H, W) strides that are
    not one token index."""
    from evit_kernels.triton.relu_linear_attention import HEAD_DIMS, flattenable

    reasons = []
    if dim not in HEAD_DIMS:
        reasons.append(f"head dim {dim} (the Triton kernels take {HEAD_DIMS})")
    if not all(flattenable(t) for t in (qkv, *aggregated)):
        reasons.append("an input's (H, W) strides cannot be walked as one token index (make it contiguous or "
                       "channels_last)")
    return reasons


dispatch.register("relu_linear_attention", dispatch.Backend("triton", _triton_forward, _triton_reasons,
                                                            backward=_triton_backward))


def relu_linear_attention(qkv: Tensor, aggregated: Sequence[Tensor], dim: int, eps: float,
                          backend: str = "auto") -> Tensor:
    """LiteMLA's attention before ``proj``.

    ``qkv`` is (B, 3·TD, H, W) as LiteMLA's qkv conv makes it, head-interleaved (per head: q, k, v blocks of
    ``dim`` channels); ``aggregated`` holds S ≥ 0 tensors of the same shape (the multi-scale aggregations).
    Returns (B, (1+S)·TD, H, W) in ``qkv``'s dtype, heads of ``qkv`` first. ``eps`` is the module's own
    (timm 1e-5, mit-han-lab 1e-15).
    """
    aggregated = list(aggregated)
    _check_shapes(qkv, aggregated, dim)
    return dispatch.run(ReluLinearAttentionArgs(qkv, aggregated, dim, float(eps)).cast_and_checked(), backend)


def _check_shapes(qkv: Tensor, aggregated: list[Tensor], dim: int) -> None:
    if qkv.dim() != 4:
        raise ValueError(f"relu_linear_attention: qkv must be (B, 3·heads·dim, H, W), got shape {tuple(qkv.shape)}")
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"relu_linear_attention: dim must be a positive int, got {dim!r}")
    if qkv.shape[1] == 0 or qkv.shape[1] % (3 * dim):
        raise ValueError(f"relu_linear_attention: qkv has {qkv.shape[1]} channels, not a positive multiple of "
                         f"3·dim = {3 * dim}")
    for index, tensor in enumerate(aggregated):
        if tensor.shape != qkv.shape:
            raise ValueError(f"relu_linear_attention: aggregated[{index}] has shape {tuple(tensor.shape)} but qkv "
                             f"has {tuple(qkv.shape)}")


# --- evit::relu_linear_attention_aggregated ---------------------------------------------------------------------

_AGGREGATED = "relu_linear_attention_aggregated"


@dataclass(frozen=True)
class AggregatedArgs(OpArgs):
    """The arguments of ``evit::relu_linear_attention_aggregated`` (see :func:`relu_linear_attention_aggregated`):
    per scale s, ``dw_weights[s]``, ``dw_biases[s]``, ``pw_weights[s]``, ``pw_biases[s]``."""

    op: ClassVar[str] = _AGGREGATED
    qkv: Tensor
    dw_weights: list[Tensor]
    dw_biases: list[Tensor | None]
    pw_weights: list[Tensor]
    pw_biases: list[Tensor | None]
    dim: int
    eps: float

    def output_shape(self) -> list[int]:
        batch, channels, height, width = self.qkv.shape
        return [batch, (1 + len(self.dw_weights)) * (channels // 3), height, width]

    def scales(self) -> list[tuple[Tensor, Tensor | None, Tensor, Tensor | None]]:
        return list(zip(self.dw_weights, self.dw_biases, self.pw_weights, self.pw_biases, strict=True))


def relu_linear_attention_aggregated_reference(a: AggregatedArgs) -> Tensor:
    """Eager PyTorch: :func:`relu_linear_attention_reference` over ``qkv`` and its
    :func:`multiscale_aggregation_reference` per scale (pointwise groups = 3·heads)."""
    groups = a.qkv.shape[1] // a.dim
    aggregated = [multiscale_aggregation_reference(MultiscaleAggregationArgs(a.qkv, *scale, groups))
                  for scale in a.scales()]
    return relu_linear_attention_reference(ReluLinearAttentionArgs(a.qkv, aggregated, a.dim, a.eps))


# This op is for inference (FusedLiteMLA takes it only when no gradient is needed); its gradient is the reference's.
define_op(AggregatedArgs, relu_linear_attention_aggregated_reference)


def _triton_aggregated_forward(a: AggregatedArgs) -> Tensor:
    from evit_kernels.triton import relu_linear_attention as kernels

    return kernels.forward_aggregated(a.qkv, a.scales(), a.dim, a.eps)


def _triton_aggregated_reasons(a: AggregatedArgs) -> list[str]:
    from evit_kernels.triton.relu_linear_attention import AGGREGATION_KERNEL_SIZES

    reasons = _head_reasons(a.qkv, [], a.dim)
    sizes = sorted({w.shape[-1] for w in a.dw_weights} - set(AGGREGATION_KERNEL_SIZES))
    if sizes:
        reasons.append(f"depthwise kernel size(s) {sizes} (the Triton kernels take {AGGREGATION_KERNEL_SIZES})")
    return reasons


dispatch.register(_AGGREGATED, dispatch.Backend("triton", _triton_aggregated_forward, _triton_aggregated_reasons))


def relu_linear_attention_aggregated(qkv: Tensor, dw_weights: Sequence[Tensor], dw_biases: Sequence[Tensor | None],
                                     pw_weights: Sequence[Tensor], pw_biases: Sequence[Tensor | None], dim: int,
                                     eps: float, backend: str = "auto") -> Tensor:
    """``relu_linear_attention(qkv, [multiscale_aggregation(qkv, dw_weights[s], dw_biases[s], pw_weights[s],
    pw_biases[s], 3·heads) for each scale s], dim, eps)`` as one op, so that a backend may compute the aggregated
    maps on the fly instead of writing them. Per scale: ``dw_weights[s]`` (C, 1, k, k) with k odd, ``pw_weights[s]``
    (C, dim, 1, 1), biases (C,) or None. Returns (B, (1+S)·TD, H, W) in ``qkv``'s dtype."""
    return dispatch.call(*choose_aggregated(qkv, dw_weights, dw_biases, pw_weights, pw_biases, dim, eps, backend))


def choose_aggregated(qkv: Tensor, dw_weights: Sequence[Tensor], dw_biases: Sequence[Tensor | None],
                      pw_weights: Sequence[Tensor], pw_biases: Sequence[Tensor | None], dim: int, eps: float,
                      backend: str = "auto") -> tuple[dispatch.Backend, AggregatedArgs]:
    """(the backend :func:`relu_linear_attention_aggregated` runs these arguments on, the op's prepared arguments):
    for callers that decide on the backend before running it with :func:`dispatch.call` (raises as it would)."""
    args = _aggregated_args(qkv, dw_weights, dw_biases, pw_weights, pw_biases, dim, eps)
    return dispatch.choose(args, backend), args


def _aggregated_args(qkv, dw_weights, dw_biases, pw_weights, pw_biases, dim, eps) -> AggregatedArgs:
    """The op's arguments, shape-checked, cast as autocast would, and dtype-checked."""
    scales = [list(t) for t in (dw_weights, dw_biases, pw_weights, pw_biases)]
    if len({len(s) for s in scales}) != 1:
        raise ValueError(f"{_AGGREGATED}: dw_weights, dw_biases, pw_weights and pw_biases must have one entry per "
                         f"scale, got lengths {[len(s) for s in scales]}")
    _check_shapes(qkv, [], dim)
    for dw, dw_b, pw, pw_b in zip(*scales):
        _check_aggregation_shapes(qkv, dw, dw_b, pw, pw_b, qkv.shape[1] // dim)
    return AggregatedArgs(qkv, *scales, dim, float(eps)).cast_and_checked()
