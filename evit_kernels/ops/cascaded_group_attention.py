"""``evit::cascaded_group_attention``: MSRA EfficientViT's cascaded group attention over local windows.

Inference form (every BatchNorm folded into the conv before it) of timm's ``LocalWindowAttention`` /
``CascadedGroupAttention`` and their Cream counterparts (SPEC.md §2.1). The map is zero padded bottom/right
to a multiple of the window and split into windows; padded tokens are not masked, as in the original. Per
window, head i reads the previous head's output plus its own input chunk (the cascade), so heads run in order.

The pieces shared with the modules' training path (partition/merge, bias index, head cascade, attention core)
live here so the two paths cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from evit_kernels import dispatch
from evit_kernels.ops._library import (
    LOW_PRECISION,
    autocast_inputs,
    check_floating_same_dtype,
    register_reference_autograd,
)

OP = "cascaded_group_attention"

WindowMeta = tuple[int, int, int, int, int]
"""``(B, H, W, pH, pW)``: batch, map size and padded map size of a partitioned map."""


def window_partition(x: Tensor, window: int) -> tuple[Tensor, WindowMeta]:
    """Split ``x`` (B, C, H, W) into (B·nH·nW, C, window, window) windows, row-major per image, after zero
    padding the bottom and right to a multiple of ``window`` (padded tokens are ordinary zeros, not masked)."""
    B, C, H, W = x.shape
    pad_b, pad_r = (-H) % window, (-W) % window
    x = F.pad(x.permute(0, 2, 3, 1), (0, 0, 0, pad_r, 0, pad_b))
    pH, pW = H + pad_b, W + pad_r
    nH, nW = pH // window, pW // window
    windows = x.reshape(B, nH, window, nW, window, C).transpose(2, 3).reshape(B * nH * nW, window, window, C)
    return windows.permute(0, 3, 1, 2), (B, H, W, pH, pW)


def window_merge(windows: Tensor, meta: WindowMeta) -> Tensor:
    """Inverse of :func:`window_partition`: reassemble (B·nH·nW, C, w, w) windows into (B, C, H, W), cropping
    the padding."""
    B, H, W, pH, pW = meta
    C, window = windows.shape[1], windows.shape[-1]
    nH, nW = pH // window, pW // window
    x = windows.permute(0, 2, 3, 1).reshape(B, nH, nW, window, window, C).transpose(2, 3).reshape(B, pH, pW, C)
    return x[:, :H, :W].permute(0, 3, 1, 2)


def attention_bias_index(resolution: int, device: torch.device | str | None = None) -> Tensor:
    """(R², R²) index into a (heads, R²) bias table: ``|y1 − y2|·R + |x1 − x2|`` for row-major points."""
    coords = torch.arange(resolution, device=device)
    y = coords.repeat_interleave(resolution)
    x = coords.repeat(resolution)
    return (y[:, None] - y[None, :]).abs() * resolution + (x[:, None] - x[None, :]).abs()


def attention_core(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float) -> Tensor:
    """One head's attention: ``v · softmax((q·scale)ᵀ k + bias)ᵀ`` with q, k (B', kd, N), v (B', vd, N),
    bias (N, N) → (B', vd, N). fp16/bf16 logits are softmaxed in fp32 (N² sums); the result is in q's dtype."""
    logits = (q * scale).transpose(-2, -1) @ k
    compute = torch.float32 if logits.dtype in LOW_PRECISION else logits.dtype
    attn = (logits.to(compute) + bias.to(compute)).softmax(dim=-1).to(q.dtype)
    return v @ attn.transpose(-2, -1)


def cascade_heads(x: Tensor, qkvs: Sequence[Callable[[Tensor], Tensor]], dws: Sequence[Callable[[Tensor], Tensor]],
                  biases: Tensor, key_dim: int) -> Tensor:
    """Run the heads of a window batch ``x`` (B', C, R, R) in cascade and concatenate their outputs.

    ``qkvs[i]`` maps a (B', C/h, R, R) input to (B', 2·kd + vd, R, R); ``dws[i]`` is the depthwise conv on q;
    ``biases`` (h, N, N) are the gathered position biases. Returns (B', h·vd, R, R), before the projection.
    """
    B, _, H, W = x.shape
    chunks = x.chunk(len(qkvs), dim=1)
    scale = key_dim ** -0.5
    feat = chunks[0]
    outs = []
    for i, (qkv, dw) in enumerate(zip(qkvs, dws, strict=True)):
        if i > 0:
            feat = feat + chunks[i]
        qkv_out = qkv(feat)
        q, k, v = qkv_out.split([key_dim, key_dim, qkv_out.shape[1] - 2 * key_dim], dim=1)
        q = dw(q)
        feat = attention_core(q.flatten(2), k.flatten(2), v.flatten(2), biases[i], scale).view(B, -1, H, W)
        outs.append(feat)
    return torch.cat(outs, dim=1)


def cascaded_group_attention_reference(
        x: Tensor, qkv_weights: list[Tensor], qkv_biases: list[Tensor], dw_weights: list[Tensor],
        dw_biases: list[Tensor], attention_biases: Tensor, proj_weight: Tensor, proj_bias: Tensor,
        key_dim: int, window: int, backend: str = "torch") -> Tensor:
    """Eager PyTorch cascaded group attention with folded weights (``backend`` is ignored)."""
    windows, meta = window_partition(x, window)
    biases = attention_biases[:, attention_bias_index(window, x.device)]
    qkvs = [lambda t, w=w, b=b: F.conv2d(t, w, b) for w, b in zip(qkv_weights, qkv_biases, strict=True)]
    dws = [lambda t, w=w, b=b: F.conv2d(t, w, b, padding=w.shape[-1] // 2, groups=w.shape[0])
           for w, b in zip(dw_weights, dw_biases, strict=True)]
    heads = cascade_heads(windows, qkvs, dws, biases, key_dim)
    out = F.conv2d(F.relu(heads), proj_weight, proj_bias)
    return window_merge(out, meta).contiguous()


@torch.library.custom_op("evit::cascaded_group_attention", mutates_args=())
def _cascaded_group_attention_op(
        x: Tensor, qkv_weights: list[Tensor], qkv_biases: list[Tensor], dw_weights: list[Tensor],
        dw_biases: list[Tensor], attention_biases: Tensor, proj_weight: Tensor, proj_bias: Tensor,
        key_dim: int, window: int, backend: str) -> Tensor:
    return dispatch.get(OP, backend).forward(x, qkv_weights, qkv_biases, dw_weights, dw_biases, attention_biases,
                                              proj_weight, proj_bias, key_dim, window)


@torch.library.register_fake("evit::cascaded_group_attention")
def _(x, qkv_weights, qkv_biases, dw_weights, dw_biases, attention_biases, proj_weight, proj_bias, key_dim, window,
      backend):
    return x.new_empty((x.shape[0], proj_weight.shape[0], x.shape[2], x.shape[3]))


register_reference_autograd("evit::cascaded_group_attention", cascaded_group_attention_reference)
dispatch.register(OP, dispatch.Backend("torch", cascaded_group_attention_reference))


def cascaded_group_attention(
        x: Tensor, qkv_weights: list[Tensor], qkv_biases: list[Tensor], dw_weights: list[Tensor],
        dw_biases: list[Tensor], attention_biases: Tensor, proj_weight: Tensor, proj_bias: Tensor,
        key_dim: int, window: int, backend: str = "auto") -> Tensor:
    """Cascaded group attention of a whole map ``x`` (B, C, H, W) in window×window windows (BN folded).

    Per head i of h: ``qkv_weights[i]`` (2·kd + vd, C/h, 1, 1) and ``qkv_biases[i]`` (2·kd + vd);
    ``dw_weights[i]`` (kd, 1, k_i, k_i), k_i odd, and ``dw_biases[i]`` (kd); ``attention_biases`` (h, window²);
    ``proj_weight`` (C_out, h·vd, 1, 1) and ``proj_bias`` (C_out) after the ReLU. Returns (B, C_out, H, W).
    """
    _check_shapes(x, qkv_weights, qkv_biases, dw_weights, dw_biases, attention_biases, proj_weight, proj_bias,
                  key_dim, window)
    x, qkv_weights, qkv_biases, dw_weights, dw_biases, attention_biases, proj_weight, proj_bias = autocast_inputs(
        x, qkv_weights, qkv_biases, dw_weights, dw_biases, attention_biases, proj_weight, proj_bias)
    check_floating_same_dtype(OP, x, qkv_weights=qkv_weights, qkv_biases=qkv_biases, dw_weights=dw_weights,
                              dw_biases=dw_biases, attention_biases=attention_biases, proj_weight=proj_weight,
                              proj_bias=proj_bias)
    args = (x, list(qkv_weights), list(qkv_biases), list(dw_weights), list(dw_biases), attention_biases,
            proj_weight, proj_bias, key_dim, window)
    chosen = dispatch.choose(OP, *args, backend=backend)
    return torch.ops.evit.cascaded_group_attention(*args, chosen.name)


def _check_shapes(x, qkv_weights, qkv_biases, dw_weights, dw_biases, attention_biases, proj_weight, proj_bias,
                  key_dim, window) -> None:
    def fail(message: str) -> None:
        raise ValueError(f"{OP}: {message}")

    if not isinstance(x, Tensor) or x.dim() != 4:
        fail(f"x must be a (B, C, H, W) tensor, got shape {tuple(getattr(x, 'shape', ()))}")
    if key_dim < 1 or window < 1:
        fail(f"key_dim and window must be positive, got key_dim={key_dim}, window={window}")
    heads = len(qkv_weights)
    lengths = {len(qkv_biases), len(dw_weights), len(dw_biases)}
    if heads == 0 or lengths != {heads}:
        fail(f"qkv_weights, qkv_biases, dw_weights and dw_biases need one entry per head, got lengths "
             f"{[len(qkv_weights), len(qkv_biases), len(dw_weights), len(dw_biases)]}")
    C = x.shape[1]
    if C % heads:
        fail(f"{C} input channels do not split evenly into {heads} heads")
    qkv_out = qkv_weights[0].shape[0]
    val_dim = qkv_out - 2 * key_dim
    if val_dim < 1:
        fail(f"qkv conv has {qkv_out} output channels, need more than 2·key_dim = {2 * key_dim}")
    if heads > 1 and val_dim != C // heads:
        fail(f"the cascade adds each head's output ({val_dim} value channels) to the next head's input chunk "
             f"({C}/{heads} = {C // heads} channels); they must match")
    for i in range(heads):
        if tuple(qkv_weights[i].shape) != (qkv_out, C // heads, 1, 1):
            fail(f"qkv_weights[{i}] has shape {tuple(qkv_weights[i].shape)}, expected "
                 f"{(qkv_out, C // heads, 1, 1)} (C/heads = {C}/{heads} input channels)")
        if tuple(qkv_biases[i].shape) != (qkv_out,):
            fail(f"qkv_biases[{i}] has shape {tuple(qkv_biases[i].shape)}, expected {(qkv_out,)}")
        ks = dw_weights[i].shape[-1]
        if dw_weights[i].dim() != 4 or tuple(dw_weights[i].shape) != (key_dim, 1, ks, ks) or ks % 2 == 0:
            fail(f"dw_weights[{i}] has shape {tuple(dw_weights[i].shape)}, expected (key_dim={key_dim}, 1, k, k) "
                 f"with k odd")
        if tuple(dw_biases[i].shape) != (key_dim,):
            fail(f"dw_biases[{i}] has shape {tuple(dw_biases[i].shape)}, expected {(key_dim,)}")
    if tuple(attention_biases.shape) != (heads, window * window):
        fail(f"attention_biases has shape {tuple(attention_biases.shape)}, expected (heads, window²) = "
             f"{(heads, window * window)}")
    if proj_weight.dim() != 4 or tuple(proj_weight.shape[1:]) != (heads * val_dim, 1, 1):
        fail(f"proj_weight has shape {tuple(proj_weight.shape)}, expected (C_out, heads·val_dim = "
             f"{heads * val_dim}, 1, 1)")
    if tuple(proj_bias.shape) != (proj_weight.shape[0],):
        fail(f"proj_bias has shape {tuple(proj_bias.shape)}, expected {(proj_weight.shape[0],)}")
