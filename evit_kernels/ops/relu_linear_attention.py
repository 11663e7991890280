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
            grad_q, grad_k, grad_v, _, _ = _attention_backward(q, k, v, q_passes, k_passes,
                                                               grad_by_group[:, index].to(q.dtype), eps)
            grad = torch.cat([grad_q, grad_k, grad_v], dim=2).to(group.dtype)
            grads.append(grad.reshape(group.shape))
    return {"qkv": grads[0], "aggregated": grads[1:]}


def _attention_backward(q: Tensor, k: Tensor, v: Tensor, q_passes: Tensor, k_passes: Tensor, grad: Tensor,
                        eps: float, rotated_q: Tensor | None = None, rotated_k: Tensor | None = None
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """(dq, dk, dv, d rotated_q, d rotated_k), each (B, heads, d, N) in the accumulation dtype, from the ReLU'd
    q, k (B, heads, d, N), v, the ReLU's pass masks and ``grad`` (B, heads, d, N), recomputing kv and z (see
    :func:`relu_linear_attention_backward_reference`). With ``rotated_q`` / ``rotated_k`` (the video transformer's
    form) the numerator takes them in place of q and k, used as given (no ReLU), and the denominator keeps q and
    k; without them their gradients are None."""
    num_q = q if rotated_q is None else rotated_q
    num_k = k if rotated_k is None else rotated_k
    kv, z = _kv_and_z(k, v, rotated_k)
    num, den = _numerator_and_denominator(q, kv, z, eps, rotated_q)
    grad_num = grad / den
    grad_den = -(grad_num * (num / den)).sum(dim=-2, keepdim=True)
    grad_num_q, grad_den_q = kv @ grad_num, z.unsqueeze(-1) * grad_den
    grad_kv = num_q @ grad_num.transpose(-1, -2)
    grad_z = (q * grad_den).sum(dim=-1, keepdim=True)
    grad_num_k, grad_v = grad_kv @ v, grad_kv.transpose(-1, -2) @ num_k
    if rotated_q is None:
        grad_q, grad_rotated_q = (grad_num_q + grad_den_q) * q_passes, None
    else:
        grad_q, grad_rotated_q = grad_den_q * q_passes, grad_num_q
    if rotated_k is None:
        grad_k, grad_rotated_k = (grad_num_k + grad_z) * k_passes, None
    else:
        grad_k, grad_rotated_k = grad_z * k_passes, grad_num_k
    return grad_q, grad_k, grad_v, grad_rotated_q, grad_rotated_k


def _relu_qkv(group: Tensor, dim: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """q, k, v of each head of ``group`` (B, heads·3·dim, H, W) as (B, heads, dim, N) in the accumulation dtype,
    q and k through the ReLU, plus the ReLU's pass masks for q and k."""
    batch, channels = group.shape[:2]
    per_head = group.reshape(batch, channels // (3 * dim), 3 * dim, -1)
    q, k, v = per_head.to(torch.promote_types(group.dtype, torch.float32)).split(dim, dim=2)
    return torch.relu(q), torch.relu(k), v, q > 0, k > 0


def _kv_and_z(k: Tensor, v: Tensor, rotated_k: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``kv[i, j] = Σ_n k[i, n] v[j, n]`` (B, heads, d, d) and ``z = Σ_n k[:, n]`` (B, heads, d); kv takes
    ``rotated_k`` in place of k when given."""
    return (k if rotated_k is None else rotated_k) @ v.transpose(-1, -2), k.sum(dim=-1)


def _numerator_and_denominator(q: Tensor, kv: Tensor, z: Tensor, eps: float,
                               rotated_q: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``kvᵀ q_n`` (B, heads, d, N) and ``z·q_n + eps`` (B, heads, 1, N); the numerator takes ``rotated_q`` in place
    of q when given."""
    return kv.transpose(-1, -2) @ (q if rotated_q is None else rotated_q), z.unsqueeze(-2) @ q + eps


define_op(ReluLinearAttentionArgs, relu_linear_attention_reference, relu_linear_attention_backward_reference)


def _triton_forward(a: ReluLinearAttentionArgs) -> Tensor:
    from evit_kernels.triton import relu_linear_attention as kernels

    return kernels.forward([a.qkv, *a.aggregated], a.dim, a.eps)


def _triton_backward(a: ReluLinearAttentionArgs, grad_out: Tensor) -> dict[str, Any]:
    from evit_kernels.triton import relu_linear_attention as kernels

    grad_qkv, *grad_aggregated = kernels.backward([a.qkv, *a.aggregated], grad_out, a.dim, a.eps)
    return {"qkv": grad_qkv, "aggregated": grad_aggregated}


def _triton_reasons(a: ReluLinearAttentionArgs) -> list[str]:
    from evit_kernels.triton.relu_linear_attention import HEAD_DIMS

    return _head_reasons(a.qkv, a.aggregated, a.dim, HEAD_DIMS)


def _head_reasons(qkv: Tensor, aggregated: list[Tensor], dim: int, head_dims: tuple[int, ...]) -> list[str]:
    """What the Triton kernels of both ops refuse in the head layout: a head dim not in ``head_dims``, and (H, W)
    strides that are not one token index."""
    from evit_kernels.triton.relu_linear_attention import flattenable

    reasons = []
    if dim not in head_dims:
        reasons.append(f"head dim {dim} (the Triton kernels take {head_dims})")
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
    from evit_kernels.triton.relu_linear_attention import AGGREGATION_KERNEL_SIZES, WHOLE_HEAD_DIMS

    reasons = _head_reasons(a.qkv, [], a.dim, WHOLE_HEAD_DIMS)
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


# --- evit::relu_linear_attention_tokens -------------------------------------------------------------------------

_TOKENS = "relu_linear_attention_tokens"


@dataclass(frozen=True)
class TokenMajorArgs(OpArgs):
    """The arguments of ``evit::relu_linear_attention_tokens`` (see :func:`relu_linear_attention_tokens`)."""

    op: ClassVar[str] = _TOKENS
    q: Tensor
    k: Tensor
    v: Tensor
    rotated_q: Tensor | None
    rotated_k: Tensor | None
    heads: int
    eps: float

    def output_shape(self) -> list[int]:
        return list(self.q.shape)


def _token_heads(t: Tensor, heads: int) -> Tensor:
    """(B, N, heads·d) as (B, heads, d, N) in the accumulation dtype (a view when it already is in it)."""
    batch, tokens, channels = t.shape
    return t.reshape(batch, tokens, heads, channels // heads).permute(0, 2, 3, 1).to(
        torch.promote_types(t.dtype, torch.float32))


def _token_inputs(a: TokenMajorArgs) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """q and k through the ReLU, v, and the rotated q and k (or None), each (B, heads, d, N) in the accumulation
    dtype."""
    q, k, v, rotated_q, rotated_k = (None if t is None else _token_heads(t, a.heads) for t in a.fields()[:5])
    return torch.relu(q), torch.relu(k), v, rotated_q, rotated_k


def relu_linear_attention_tokens_reference(a: TokenMajorArgs) -> Tensor:
    """Eager PyTorch forward: (B, N, heads·d) in ``q``'s dtype, computed in fp32 (fp64 for fp64 inputs) as Sana's
    processors upcast."""
    with autocast_off(a.q):
        q, k, v, rotated_q, rotated_k = _token_inputs(a)
        kv, z = _kv_and_z(k, v, rotated_k)
        num, den = _numerator_and_denominator(q, kv, z, a.eps, rotated_q)
        out = num / den  # (B, heads, d, N)
    return out.permute(0, 3, 1, 2).reshape(a.q.shape).to(a.q.dtype)


def relu_linear_attention_tokens_backward_reference(a: TokenMajorArgs, grad_out: Tensor) -> dict[str, Any]:
    """Gradients of q, k, v (and of the rotated q and k when given), by field name, in their dtypes; kv and z
    recomputed (:func:`_attention_backward`). ``grad_out`` may have any strides."""
    with autocast_off(a.q):
        q, k, v, rotated_q, rotated_k = _token_inputs(a)
        grad = _token_heads(grad_out, a.heads).to(q.dtype)
        grads = _attention_backward(q, k, v, q > 0, k > 0, grad, a.eps, rotated_q, rotated_k)
    names = ("q", "k", "v", "rotated_q", "rotated_k")
    return {name: None if g is None else g.permute(0, 3, 1, 2).reshape(t.shape).to(t.dtype)
            for name, g, t in zip(names, grads, a.fields()[:5], strict=True)}


define_op(TokenMajorArgs, relu_linear_attention_tokens_reference, relu_linear_attention_tokens_backward_reference)


def _triton_tokens_forward(a: TokenMajorArgs) -> Tensor:
    from evit_kernels.triton import relu_linear_attention as kernels

    dim = a.q.shape[-1] // a.heads
    out = a.new_output()
    src = kernels.token_major(a.q, a.k, a.v, dim, a.rotated_q, a.rotated_k)
    kernels.attend(src, out, kernels.token_major_strides(out), 0, dim, a.eps)
    return out


def _triton_tokens_backward(a: TokenMajorArgs, grad_out: Tensor) -> dict[str, Any]:
    from evit_kernels.triton import relu_linear_attention as kernels

    dim = a.q.shape[-1] // a.heads
    names = ("q", "k", "v") + (("rotated_q", "rotated_k") if a.rotated_q is not None else ())
    grads = [torch.empty(a.q.shape, dtype=a.q.dtype, device=a.q.device) for _ in names]
    kernels.backward_into(kernels.token_major(a.q, a.k, a.v, dim, a.rotated_q, a.rotated_k), grad_out,
                          kernels.token_major_strides(grad_out), kernels.token_major(*grads[:3], dim, *grads[3:]), 0,
                          dim, a.eps)
    return dict(zip(names, grads, strict=True))


def _triton_tokens_reasons(a: TokenMajorArgs) -> list[str]:
    from evit_kernels.triton.relu_linear_attention import HEAD_DIMS

    reasons = []
    dim = a.q.shape[-1] // a.heads
    if dim not in HEAD_DIMS:
        reasons.append(f"head dim {dim} (the Triton kernels take {HEAD_DIMS})")
    if a.k.shape != a.q.shape:
        reasons.append(f"k and v have {a.k.shape[1]} tokens and q {a.q.shape[1]} (the kernels take one token count)")
    elif len({t.stride() for t in a.tensors()}) > 1:
        reasons.append(f"q, k, v (and the rotated q, k) have different strides {[t.stride() for t in a.tensors()]} "
                       "(the kernels read them with one set)")
    return reasons


dispatch.register(_TOKENS, dispatch.Backend("triton", _triton_tokens_forward, _triton_tokens_reasons,
                                            backward=_triton_tokens_backward))


def relu_linear_attention_tokens(q: Tensor, k: Tensor, v: Tensor, heads: int, eps: float,
                                 rotated_q: Tensor | None = None, rotated_k: Tensor | None = None,
                                 backend: str = "auto") -> Tensor:
    """Sana's ReLU linear attention in the token-major layout its projections produce, without transposes.

    ``q`` is (B, N, heads·d), ``k`` and ``v`` (B, M, heads·d), channel ``h·d + i`` being component i of head h.
    Per (batch, head), with q and k through the ReLU: ``kv = Σ_m k_m v_mᵀ``, ``z = Σ_m k_m``,
    ``out_n = kvᵀ q_n / (z·q_n + eps)``, in fp32 (fp64 for fp64 inputs), returned as (B, N, heads·d) in q's dtype.
    ``eps`` is the caller's (Sana's processors use 1e-15). ``rotated_q`` and ``rotated_k`` (shaped as q and k,
    given together) are the video transformer's form: the numerator ``kv = Σ_m k̃_m v_mᵀ``, ``kvᵀ q̃_n`` takes them,
    as given (no ReLU), and the denominator keeps the ReLU'd q and k.
    """
    _check_token_shapes(q, k, v, heads, rotated_q, rotated_k)
    args = TokenMajorArgs(q, k, v, rotated_q, rotated_k, heads, float(eps)).cast_and_checked()
    return dispatch.run(args, backend)


def _check_token_shapes(q: Tensor, k: Tensor, v: Tensor, heads: int, rotated_q: Tensor | None,
                        rotated_k: Tensor | None) -> None:
    shapes = {name: tuple(t.shape) for name, t in (("q", q), ("k", k), ("v", v))}
    if any(len(shape) != 3 for shape in shapes.values()):
        raise ValueError(f"{_TOKENS}: q, k and v must be (B, N, heads·d), got shapes {shapes}")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"{_TOKENS}: k and v must have one shape (B, M, C) and q (B, N, C), got {shapes}")
    if not isinstance(heads, int) or heads < 1 or q.shape[2] == 0 or q.shape[2] % heads:
        raise ValueError(f"{_TOKENS}: heads must be a positive int dividing the {q.shape[2]} channels, got {heads!r}")
    if (rotated_q is None) != (rotated_k is None):
        raise ValueError(f"{_TOKENS}: rotated_q and rotated_k go together (give both or neither)")
    if rotated_q is not None and (rotated_q.shape != q.shape or rotated_k.shape != k.shape):
        raise ValueError(f"{_TOKENS}: rotated_q and rotated_k must be shaped as q and k, got "
                         f"{tuple(rotated_q.shape)} and {tuple(rotated_k.shape)}")
