"""``evit::cascaded_group_attention``: MSRA EfficientViT's cascaded group attention over local windows.

Inference form (every BatchNorm folded into the conv before it) of timm's ``LocalWindowAttention`` /
``CascadedGroupAttention`` and their Cream counterparts (docs/ops.md, "Cascaded group attention and window
attention"). The map is zero padded bottom/right
to a multiple of the window and split into windows; padded tokens are not masked, as in the original. Per
window, head i reads the previous head's output plus its own input chunk (the cascade), so heads run in order.

The pieces shared with the modules' training path (partition/merge, bias index, head cascade, attention core)
live here so the two paths cannot drift apart. The attention core of one head over a window batch is its own op,
``evit::window_attention`` (with a Triton forward and backward), so the training path, which runs the convs
and BatchNorms as they are, also gets the fused core; the whole-map op's Triton backend is the same Python
composition with that core on Triton.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from evit_kernels import _extension, dispatch
from evit_kernels.ops._library import LOW_PRECISION, OpArgs, define_op

OP = "cascaded_group_attention"
WINDOW_OP = "window_attention"

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
    """(R², R²) index into a (heads, R²) bias table: ``|y1 − y2|·R + |x1 − x2|`` for row-major points.

    Built once per (R, device) when running eagerly (every head of every call needs it), as a normal tensor
    even under inference mode (autograd saves it when the bias needs a gradient). Built afresh whenever the
    call is being traced (torch.compile, or any dispatch mode such as fake tensors or make_fx), where a cached
    real tensor would not belong.
    """
    eager = (type(resolution) is int and not torch.compiler.is_compiling()
             and torch._C._len_torch_dispatch_stack() == 0)
    if not eager:
        return _bias_index(resolution, device)
    key = (resolution, str(torch.device(device) if device is not None else torch.device("cpu")))
    if key not in _BIAS_INDEX_CACHE:
        with torch.inference_mode(False):
            _BIAS_INDEX_CACHE[key] = _bias_index(resolution, device)
    return _BIAS_INDEX_CACHE[key]


_BIAS_INDEX_CACHE: dict[tuple[int, str], Tensor] = {}


def _bias_index(resolution: int, device: torch.device | str | None) -> Tensor:
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


@dataclass(frozen=True)
class WindowAttentionArgs(OpArgs):
    """The arguments of ``evit::window_attention`` (see :func:`window_attention`)."""

    op: ClassVar[str] = WINDOW_OP
    q: Tensor
    k: Tensor
    v: Tensor
    bias_row: Tensor
    resolution: int
    scale: float

    def output_shape(self) -> list[int]:
        return [self.q.shape[0], self.v.shape[1], self.q.shape[2]]


def window_attention_reference(a: WindowAttentionArgs) -> Tensor:
    """:func:`attention_core` with the (N, N) bias gathered from one head's (R²,) row of ``attention_biases``."""
    return attention_core(a.q, a.k, a.v, a.bias_row[attention_bias_index(a.resolution, a.q.device)], a.scale)


define_op(WindowAttentionArgs, window_attention_reference)


def _window_triton_forward(a: WindowAttentionArgs) -> Tensor:
    from evit_kernels.triton import cascaded_group_attention as kernels

    return kernels.forward(a.q, a.k, a.v, a.bias_row, a.resolution, a.scale)


def _window_triton_backward(a: WindowAttentionArgs, grad: Tensor) -> dict[str, Tensor]:
    from evit_kernels.triton import cascaded_group_attention as kernels

    grad_q, grad_k, grad_v, grad_bias = kernels.backward(a.q, a.k, a.v, a.bias_row, grad, a.resolution, a.scale)
    return {"q": grad_q, "k": grad_k, "v": grad_v, "bias_row": grad_bias.to(a.bias_row.dtype)}


def _window_triton_reasons(a: WindowAttentionArgs) -> list[str]:
    from evit_kernels.triton.cascaded_group_attention import MAX_RESOLUTION

    if a.resolution > MAX_RESOLUTION:
        return [f"window {a.resolution}×{a.resolution} > {MAX_RESOLUTION}×{MAX_RESOLUTION} (the kernels keep the "
                f"N×N scores in registers)"]
    return []


dispatch.register(WINDOW_OP, dispatch.Backend("triton", _window_triton_forward, _window_triton_reasons,
                                              backward=_window_triton_backward))


def window_attention(q: Tensor, k: Tensor, v: Tensor, bias_row: Tensor, resolution: int, scale: float,
                     backend: str = "auto") -> Tensor:
    """One head's attention over a batch of R×R windows: ``v · softmax(scale·qᵀk + B)ᵀ``.

    q, k (B', kd, N) and v (B', vd, N) with N = R² tokens in row-major order; ``bias_row`` (R²,) is the head's
    row of ``attention_biases``, gathered as ``B[i, j] = bias_row[|y_i − y_j|·R + |x_i − x_j|]``. The softmax
    is computed in fp32 for fp16/bf16 inputs; ``bias_row`` may be in fp32 (the parameter under autocast) or in
    the input dtype. Returns (B', vd, N) in q's dtype.
    """
    _check_window_shapes(q, k, v, bias_row, resolution)
    # The bias row keeps its dtype (fp32, the parameter, under autocast): it is only added to fp32 logits.
    args = WindowAttentionArgs(q, k, v, bias_row, resolution, float(scale)).cast_and_checked(keep=("bias_row",))
    if not bias_row.is_floating_point():
        raise TypeError(f"{WINDOW_OP}: bias_row must be a floating tensor, got {bias_row.dtype}")
    if bias_row.device != args.q.device:
        raise ValueError(f"{WINDOW_OP}: bias_row is on {bias_row.device} but q is on {args.q.device}")
    return dispatch.run(args, backend)


def _check_window_shapes(q: Tensor, k: Tensor, v: Tensor, bias_row: Tensor, resolution: int) -> None:
    if not all(isinstance(t, Tensor) and t.dim() == 3 for t in (q, k, v)):
        raise ValueError(f"{WINDOW_OP}: q, k and v must be (B', channels, N) tensors")
    if not isinstance(resolution, (int, torch.SymInt)) or resolution < 1:
        raise ValueError(f"{WINDOW_OP}: resolution must be a positive int, got {resolution!r}")
    n = resolution * resolution
    if q.shape != k.shape or v.shape[0] != q.shape[0] or q.shape[2] != n or v.shape[2] != n:
        raise ValueError(f"{WINDOW_OP}: expected q and k (B', kd, {n}) and v (B', vd, {n}) for a {resolution}×"
                         f"{resolution} window, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if tuple(bias_row.shape) != (n,):
        raise ValueError(f"{WINDOW_OP}: bias_row must be one head's ({n},) row of attention_biases, got shape "
                         f"{tuple(bias_row.shape)}")


def cascade_heads(x: Tensor, qkvs: Sequence[Callable[[Tensor], Tensor]], dws: Sequence[Callable[[Tensor], Tensor]],
                  attention_biases: Tensor, key_dim: int, backend: str = "auto") -> Tensor:
    """Run the heads of a window batch ``x`` (B', C, R, R) in cascade and concatenate their outputs.

    ``qkvs[i]`` maps a (B', C/h, R, R) input to (B', 2·kd + vd, R, R); ``dws[i]`` is the depthwise conv on q;
    ``attention_biases`` (h, R²) is the position-bias table. ``backend`` picks the attention core's
    implementation (:func:`window_attention`). Returns (B', h·vd, R, R), before the projection.
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
        feat = window_attention(q.flatten(2), k.flatten(2), v.flatten(2), attention_biases[i], H, scale,
                                backend=backend).view(B, -1, H, W)
        outs.append(feat)
    return torch.cat(outs, dim=1)


@dataclass(frozen=True)
class CascadedGroupAttentionArgs(OpArgs):
    """The arguments of ``evit::cascaded_group_attention`` (see :func:`cascaded_group_attention`)."""

    op: ClassVar[str] = OP
    x: Tensor
    qkv_weights: list[Tensor]
    qkv_biases: list[Tensor]
    dw_weights: list[Tensor]
    dw_biases: list[Tensor]
    attention_biases: Tensor
    proj_weight: Tensor
    proj_bias: Tensor
    key_dim: int
    window: int

    def output_shape(self) -> list[int]:
        return [self.x.shape[0], self.proj_weight.shape[0], self.x.shape[2], self.x.shape[3]]


def _composition(a: CascadedGroupAttentionArgs, core: str) -> Tensor:
    """Cascaded group attention with folded weights as a composition of PyTorch ops (convs through F.conv2d), the
    attention core (:func:`window_attention`) on backend ``core``."""
    windows, meta = window_partition(a.x, a.window)
    qkvs = [lambda t, w=w, b=b: F.conv2d(t, w, b) for w, b in zip(a.qkv_weights, a.qkv_biases, strict=True)]
    dws = [lambda t, w=w, b=b: F.conv2d(t, w, b, padding=w.shape[-1] // 2, groups=w.shape[0])
           for w, b in zip(a.dw_weights, a.dw_biases, strict=True)]
    heads = cascade_heads(windows, qkvs, dws, a.attention_biases, a.key_dim, backend=core)
    out = F.conv2d(F.relu(heads), a.proj_weight, a.proj_bias)
    return window_merge(out, meta).contiguous()


def cascaded_group_attention_reference(a: CascadedGroupAttentionArgs) -> Tensor:
    """The eager reference: the composition with the attention core in PyTorch."""
    return _composition(a, core="torch")


def _triton_forward(a: CascadedGroupAttentionArgs) -> Tensor:
    """The op's Triton backend: where the whole-window kernels take the shape, one kernel runs every head of a window
    with the window on chip (or, for wide heads, one launch per head) and writes the relu of their outputs, and the
    projection is ``evit::conv_bn_act``'s 1×1 kernel; elsewhere the composition with the attention core on Triton
    (saying why, once)."""
    from evit_kernels.ops.conv_bn_act import ConvBnActArgs
    from evit_kernels.triton import cascaded_group_attention as kernels
    from evit_kernels.triton.conv_bn_act import dense

    refused = whole_map_kernel_reasons(a)
    if refused:
        dispatch.log_once(OP, f"{OP}: the eager composition around the Triton attention core, not the whole-window "
                              f"kernel: {'; '.join(refused)}")
        return _composition(a, core="triton")
    heads = kernels.whole_map_heads(a.x, a.qkv_weights, a.qkv_biases, a.dw_weights, a.dw_biases,
                                    a.attention_biases, a.key_dim, a.window)
    projection = ConvBnActArgs(heads, a.proj_weight, a.proj_bias, [1, 1], [0, 0], [1, 1], 1, "none", None)
    return dense(projection, projection.new_output())


def whole_map_kernel_reasons(a: CascadedGroupAttentionArgs) -> list[str]:
    """What the whole-window kernel does not take (the Triton backend then runs the composition)."""
    from evit_kernels.triton._common import cdiv, dot_size
    from evit_kernels.triton.cascaded_group_attention import (
        MAP_KERNEL_SIZES,
        MAP_MAX_HEADS,
        grid_side,
        head_warps,
        map_warps,
    )

    reasons = []
    B, C, H, W = a.x.shape
    heads = len(a.qkv_weights)
    val_dim = a.qkv_weights[0].shape[0] - 2 * a.key_dim
    if val_dim != C // heads:
        reasons.append(f"value dim {val_dim} ≠ C/heads = {C}/{heads} (the kernel carries each head's output into "
                       f"the next head's input)")
    if map_warps(a.x.dtype, a.window, val_dim) is None and head_warps(a.x.dtype, a.window, val_dim) is None:
        reasons.append(f"{str(a.x.dtype).removeprefix('torch.')} heads of {val_dim} channels on {a.window}×{a.window} "
                       f"windows (a head's input, output and values stay in registers, and would spill)")
    if heads > MAP_MAX_HEADS:
        reasons.append(f"{heads} heads > {MAP_MAX_HEADS}")
    sizes = sorted({w.shape[-1] for w in a.dw_weights})
    if any(k not in MAP_KERNEL_SIZES for k in sizes):
        reasons.append(f"depthwise kernel sizes {sizes} (the kernel takes {MAP_KERNEL_SIZES})")
    windows = B * cdiv(H, a.window) * cdiv(W, a.window)
    per_head = map_warps(a.x.dtype, a.window, val_dim) is None  # each head's output passes through a scratch too
    scratch_rows = max(dot_size(a.key_dim), dot_size(val_dim) if per_head else 0)
    if windows * scratch_rows * grid_side(a.window) ** 2 >= 2**31:
        reasons.append("a scratch tile per window of 2^31 elements or more (the kernel indexes with 32 bits)")
    if 2 * dispatch.span(a.x) >= 2**31:  # the map and the heads' output (the same size) are indexed with 32 bits
        reasons.append("a map of 2^30 elements or more (the kernel indexes with 32 bits)")
    return reasons


def _triton_reasons(a: CascadedGroupAttentionArgs) -> list[str]:
    """What keeps the Triton attention core from running every head (in the composition, the convs run through
    PyTorch)."""
    from evit_kernels.triton._common import cdiv
    from evit_kernels.triton.cascaded_group_attention import MAX_RESOLUTION

    reasons = []
    if a.window > MAX_RESOLUTION:
        reasons.append(f"window {a.window}×{a.window} > {MAX_RESOLUTION}×{MAX_RESOLUTION} (the kernels keep the "
                       f"N×N scores in registers)")
    B, _, H, W = a.x.shape
    per_head = B * cdiv(H, a.window) * cdiv(W, a.window) * a.window * a.window * a.qkv_weights[0].shape[0]
    if per_head >= 2**31:
        reasons.append("a head's qkv map of 2^31 elements or more (the kernels index with 32 bits)")
    return reasons


def _cuda_forward(a: CascadedGroupAttentionArgs) -> Tensor:
    """The whole op in one kernel launch: one CUDA block per window (csrc/cascaded_group_attention_cuda.cu)."""
    return torch.ops.evit.cga_window_cuda(*a.fields())


# The envelope the CUDA kernels were written and tested for (the released M0-M5 attentions: key_dim 16, value dims
# 16-112, 2-4 heads with 3/5/7 depthwise kernels, windows of 7 and 4). The kernels' loops take any size; what
# bounds them is shared memory, which holds one window's activations (fp32 in the scalar kernel, the products'
# operands in fp16/bf16 in the tensor-core one).
CUDA_KEY_DIM = 16
CUDA_MAX_WINDOW = 8
CUDA_MAX_VAL_DIM = 128
CUDA_MAX_HEADS = 8
CUDA_KERNEL_SIZES = (1, 3, 5, 7)
H100_SHARED_MEMORY_PER_BLOCK = 227 * 1024
H100_ARCH_MAJOR = 9


def cuda_shared_memory_bytes(window: int, heads: int, in_width: int, key_dim: int, val_dim: int, out_channels: int,
                             dtype: torch.dtype, arch_major: int) -> int:
    """Shared memory of one block of the CUDA kernel that runs these sizes in ``dtype`` on a GPU of compute
    capability ``arch_major``.x (the tensor-core kernel or the fp32 scalar one: the head input, q, k, v, the
    attention and every head's output), as its launcher computes it: asked of ``evit_kernels._C``, which owns the
    layouts and the choice. Without ``_C`` the cuda backend cannot run, and dispatch never asks for its input
    reasons."""
    if _extension.load_error() is not None:
        raise RuntimeError(f"cuda_shared_memory_bytes needs evit_kernels._C: {_extension.load_error()}")
    # torch.compile traces the backend choice: operator.index makes symbolic sizes ints (guarded) so that the op,
    # whose int result would break the graph, runs while tracing and its result becomes a constant.
    sizes = map(operator.index, (window, heads, in_width, key_dim, val_dim, out_channels))
    return _shared_memory_bytes(*sizes, dtype, operator.index(arch_major))


@torch.compiler.assume_constant_result
def _shared_memory_bytes(*args) -> int:
    return torch.ops.evit.cga_window_cuda_shared_memory_bytes(*args)


def _cuda_reasons(a: CascadedGroupAttentionArgs) -> list[str]:
    x, qkv_weights, dw_weights, key_dim, window = a.x, a.qkv_weights, a.dw_weights, a.key_dim, a.window
    reasons = []
    if torch.is_grad_enabled() and any(t.requires_grad for t in a.tensors()):
        reasons.append("inference-only kernel (no backward): an input requires grad; run under torch.no_grad() or "
                       "torch.inference_mode(), or use the torch or triton backend to train")
    heads, C = len(qkv_weights), x.shape[1]
    val_dim = qkv_weights[0].shape[0] - 2 * key_dim
    if window > CUDA_MAX_WINDOW:
        reasons.append(f"window {window}×{window} > {CUDA_MAX_WINDOW}×{CUDA_MAX_WINDOW}")
    if key_dim != CUDA_KEY_DIM:
        reasons.append(f"key_dim {key_dim} (the CUDA kernel is built for key_dim {CUDA_KEY_DIM})")
    if not 1 <= val_dim <= CUDA_MAX_VAL_DIM:
        reasons.append(f"value dim {val_dim} outside 1..{CUDA_MAX_VAL_DIM}")
    if C != heads * val_dim:
        reasons.append(f"{C} input channels ≠ heads·value dim = {heads}·{val_dim}")
    if heads > CUDA_MAX_HEADS:
        reasons.append(f"{heads} heads > {CUDA_MAX_HEADS}")
    sizes = sorted({w.shape[-1] for w in dw_weights})
    if any(k not in CUDA_KERNEL_SIZES for k in sizes):
        reasons.append(f"depthwise kernel sizes {sizes} (the CUDA kernel takes {CUDA_KERNEL_SIZES})")
    if _extension.load_error() is None:  # without _C the machine check refuses the backend already
        on_gpu = x.device.type == "cuda"
        limit = torch.cuda.get_device_properties(x.device).shared_memory_per_block_optin if on_gpu \
            else H100_SHARED_MEMORY_PER_BLOCK
        arch_major = torch.cuda.get_device_capability(x.device)[0] if on_gpu else H100_ARCH_MAJOR
        needed = cuda_shared_memory_bytes(window, heads, C // heads, key_dim, val_dim, a.proj_weight.shape[0],
                                          x.dtype, arch_major)
        if needed > limit:
            reasons.append(f"{needed} bytes of shared memory per window > the GPU's {limit}")
    return reasons


# Every backend's gradient is the VJP of the eager composition: torch.func cannot transform through
# evit::window_attention's own autograd. This op serves inference (the modules' training path calls
# window_attention directly and so trains through its Triton backward); the cuda backend refuses gradients.
define_op(CascadedGroupAttentionArgs, cascaded_group_attention_reference)
# The composition checks each window_attention call's tensors; the whole-window kernel its own sizes above.
dispatch.register(OP, dispatch.Backend("triton", _triton_forward, _triton_reasons, int32_offsets=False))
dispatch.register(OP, dispatch.Backend("cuda", _cuda_forward, _cuda_reasons, int32_offsets=False))


def cascaded_group_attention(
        x: Tensor, qkv_weights: list[Tensor], qkv_biases: list[Tensor], dw_weights: list[Tensor],
        dw_biases: list[Tensor], attention_biases: Tensor, proj_weight: Tensor, proj_bias: Tensor,
        key_dim: int, window: int, backend: str = "auto") -> Tensor:
    """Cascaded group attention of a whole map ``x`` (B, C, H, W) in window×window windows (BN folded).

    Per head i of h: ``qkv_weights[i]`` (2·kd + vd, C/h, 1, 1) and ``qkv_biases[i]`` (2·kd + vd);
    ``dw_weights[i]`` (kd, 1, k_i, k_i), k_i odd, and ``dw_biases[i]`` (kd); ``attention_biases`` (h, window²);
    ``proj_weight`` (C_out, h·vd, 1, 1) and ``proj_bias`` (C_out) after the ReLU. Returns (B, C_out, H, W).
    """
    args = CascadedGroupAttentionArgs(x, list(qkv_weights), list(qkv_biases), list(dw_weights), list(dw_biases),
                                      attention_biases, proj_weight, proj_bias, key_dim, window)
    _check_shapes(args)
    return dispatch.run(args.cast_and_checked(), backend)


def _check_shapes(a: CascadedGroupAttentionArgs) -> None:
    x, qkv_weights, qkv_biases, dw_weights, dw_biases, attention_biases, proj_weight, proj_bias, key_dim, window = (
        a.fields())

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
