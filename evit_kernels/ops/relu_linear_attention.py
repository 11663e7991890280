"""``evit::relu_linear_attention``: LiteMLA's ReLU linear attention over the qkv map and its multi-scale
aggregations (SPEC.md §1.1 steps 3–6), with an explicit backward.

Per (batch, head) with q = relu(q), k = relu(k), v as is, over the N = H·W tokens:
``kv = Σ_n k_n v_nᵀ`` (d×d), ``z = Σ_n k_n`` (d), ``out_n = kvᵀ q_n / (z·q_n + eps)``.
kv, z and the division are computed in fp32 (fp64 for fp64 inputs) whatever the input dtype: in fp16 the sums
over N overflow 65504 and mit-han-lab's eps 1e-15 rounds to 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from evit_kernels import dispatch
from evit_kernels.ops._library import autocast_inputs, check_floating_same_dtype


def relu_linear_attention_reference(qkv: Tensor, aggregated: Sequence[Tensor], dim: int, eps: float) -> Tensor:
    """Eager PyTorch forward: (B, (1+S)·TD, H, W) in ``qkv``'s dtype, channel ``g·dim + i`` where the heads g
    run over ``qkv`` first, then over each tensor of ``aggregated``. Each group is written into its slice of
    the output; the groups are never concatenated."""
    batch, channels, height, width = qkv.shape
    heads = channels // (3 * dim)
    groups = [qkv, *aggregated]
    out = qkv.new_empty(batch, len(groups) * heads * dim, height, width)
    out_by_group = out.view(batch, len(groups), heads, dim, height * width)
    # Custom ops are invisible to autocast but the ops inside them are not: keep the fp32 matmuls in fp32.
    with torch.autocast(qkv.device.type, enabled=False):
        for index, group in enumerate(groups):
            q, k, v, _, _ = _relu_qkv(group, dim)
            kv, z = _kv_and_z(k, v)
            num, den = _numerator_and_denominator(q, kv, z, eps)
            out_by_group[:, index].copy_(num / den)
    return out


def relu_linear_attention_backward_reference(grad_out: Tensor, qkv: Tensor, aggregated: Sequence[Tensor], dim: int,
                                             eps: float) -> tuple[Tensor, list[Tensor]]:
    """Gradients for ``qkv`` and for each tensor of ``aggregated``, recomputing kv and z per (batch, head).

    With ``g = grad_out``, ``den_n = z·q_n + eps`` and ``out_n = kvᵀ q_n / den_n``:
    ``gnum_n = g_n / den_n``, ``gden_n = -gnum_n·out_n``;
    ``dq_n = kv gnum_n + z gden_n``, ``dkv = Σ_n q_n gnum_nᵀ``, ``dz = Σ_n q_n gden_n``;
    ``dk_n = dkv v_n + dz``, ``dv_n = dkvᵀ k_n``; dq and dk pass the ReLU only where its input is > 0.
    ``grad_out`` may have any strides (a stride-0 one from ``y.sum().backward()`` included).
    """
    batch, channels, height, width = qkv.shape
    heads = channels // (3 * dim)
    groups = [qkv, *aggregated]
    grad_by_group = grad_out.reshape(batch, len(groups), heads, dim, height * width)
    grads = []
    with torch.autocast(qkv.device.type, enabled=False):
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
    return grads[0], grads[1:]


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


@torch.library.custom_op("evit::relu_linear_attention", mutates_args=())
def _relu_linear_attention_op(qkv: Tensor, aggregated: list[Tensor], dim: int, eps: float, backend: str) -> Tensor:
    return dispatch.get("relu_linear_attention", backend).forward(qkv, aggregated, dim, eps)


@torch.library.register_fake("evit::relu_linear_attention")
def _relu_linear_attention_fake(qkv, aggregated, dim, eps, backend):
    batch, channels, height, width = qkv.shape
    return qkv.new_empty(batch, (1 + len(aggregated)) * (channels // 3), height, width)


def _setup_context(ctx, inputs, output):
    qkv, aggregated, ctx.dim, ctx.eps, ctx.backend = inputs
    ctx.save_for_backward(qkv, *aggregated)


def _backward(ctx, grad_out):
    qkv, *aggregated = ctx.saved_tensors
    if ctx.backend == "triton":
        from evit_kernels.triton import relu_linear_attention as kernels

        grad_qkv, *grad_aggregated = kernels.backward([qkv, *aggregated], grad_out, ctx.dim, ctx.eps)
    else:
        grad_qkv, grad_aggregated = relu_linear_attention_backward_reference(grad_out, qkv, aggregated, ctx.dim,
                                                                             ctx.eps)
    return grad_qkv, grad_aggregated, None, None, None


def _triton_forward(qkv: Tensor, aggregated: list[Tensor], dim: int, eps: float) -> Tensor:
    from evit_kernels.triton import relu_linear_attention as kernels

    return kernels.forward([qkv, *aggregated], dim, eps)


_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TRITON_MAX_DIM = 32  # the head dims whose kernels CI compiles for sm_90 (every released model: 8, 16, 32)


def _triton_reasons(qkv: Tensor, aggregated: list[Tensor], dim: int, eps: float) -> list[str]:
    from evit_kernels.triton.relu_linear_attention import flattenable

    reasons = dispatch.device_reasons("triton", qkv)
    if qkv.dtype not in _TRITON_DTYPES:
        reasons.append(f"{qkv.dtype} inputs (the Triton kernels take float32, float16 and bfloat16)")
    if dim > _TRITON_MAX_DIM:
        reasons.append(f"head dim {dim} > {_TRITON_MAX_DIM}")
    if not all(flattenable(t) for t in (qkv, *aggregated)):
        reasons.append("an input's (H, W) strides cannot be walked as one token index (make it contiguous or "
                       "channels_last)")
    if max(t.numel() for t in (qkv, *aggregated)) >= 2**31:
        reasons.append("a tensor of 2^31 elements or more (the kernels index with 32 bits)")
    return reasons


torch.library.register_autograd("evit::relu_linear_attention", _backward, setup_context=_setup_context)
dispatch.register("relu_linear_attention", dispatch.Backend("torch", relu_linear_attention_reference))
dispatch.register("relu_linear_attention", dispatch.Backend("triton", _triton_forward, _triton_reasons))


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
    qkv, aggregated = autocast_inputs(qkv, aggregated)
    check_floating_same_dtype("relu_linear_attention", qkv, aggregated=aggregated)
    eps = float(eps)
    chosen = dispatch.choose("relu_linear_attention", qkv, aggregated, dim, eps, backend=backend)
    return torch.ops.evit.relu_linear_attention(qkv, aggregated, dim, eps, chosen.name)


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
