"""Triton kernels of ``evit::conv_bn_act`` (inference) for the two convolutions that make up EfficientViT's
conv stacks: the depthwise k×k conv (k = 3, 5, 7; stride 1 or 2) and the 1×1 conv. Each computes

    out = act(conv2d(x, weight) + bias) + residual

in one pass: the conv accumulates in fp32, and bias, activation and residual are applied to the fp32
accumulator before the single rounding to the output dtype, so the per-layer intermediates eager writes and
re-reads (docs/performance.md, "Why the workload is memory bound") never leave the chip. Every tensor is read in
place through its four strides (NCHW,
channels_last or any other layout) and the output is written through the strides of the tensor the caller
allocates, so the op keeps its single layout rule. Offsets are 32-bit: callers check :func:`fits_int32`.

Bias and residual are optional at run time (a uniform branch per program), not as constexprs: that keeps the
compiled variants to kernel × dtype × activation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ACTIVATIONS = ("none", "relu", "relu6", "hardswish", "gelu", "gelu_tanh", "silu")

# Depthwise: a tile of output pixels × channels per program, each k×k tap one masked 2D load.
DW_BLOCK_P, DW_BLOCK_C = 64, 32
# 1×1: a (pixels × output channels) tile of the GEMM (B·H·W) × C_out × C_in per program.
PW_BLOCK_M, PW_BLOCK_N, PW_BLOCK_K = 64, 64, 32


def dot_size(n: int) -> int:
    """``n`` padded to a block size ``tl.dot`` takes: a power of two, at least 16."""
    return max(16, triton.next_power_of_2(n))


def span(t: torch.Tensor) -> int:
    """How many elements ``t`` spans in memory from its first one: every offset the kernels form is below it."""
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))


def fits_int32(t: torch.Tensor) -> bool:
    """Whether every element offset of ``t`` (through its strides) fits the kernels' 32-bit indexing."""
    return t.numel() < 2**31 and span(t) < 2**31


@triton.jit
def _activate(y, ACTIVATION: tl.constexpr):
    """The activation of an fp32 tile; NaN stays NaN, as in PyTorch."""
    if ACTIVATION == "relu":
        y = tl.where(y < 0, 0.0, y)
    elif ACTIVATION == "relu6":
        y = tl.where(y < 0, 0.0, tl.where(y > 6, 6.0, y))
    elif ACTIVATION == "hardswish":
        y = y * tl.where(y < -3, 0.0, tl.where(y > 3, 6.0, y + 3.0)) / 6.0
    elif ACTIVATION == "gelu":
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":
        # 0.5·(1 + tanh(u)) = sigmoid(2u) with u = √(2/π)·(y + 0.044715·y³): no tanh, no cancellation.
        y = y / (1.0 + tl.exp(-1.5957691216057308 * (y + 0.044715 * y * y * y)))
    elif ACTIVATION == "silu":
        y = y / (1.0 + tl.exp(-y))
    return y


@triton.jit
def _pixel_coords(offs, height, width):
    """(batch, row, column) of the pixels numbered ``offs`` in a (B, ·, height, width) map."""
    hw = height * width
    return offs // hw, (offs % hw) // width, offs % width


@triton.jit
def _tap(out_y, out_x, out_ok, kh, kw, stride_h, stride_w, pad_h, pad_w, height, width):
    """The input (row, column) that tap (kh, kw) of the outputs at (out_y, out_x) reads, and whether it lies in the
    map: taps in the zero padding read nothing."""
    iy = out_y * stride_h - pad_h + kh
    ix = out_x * stride_w - pad_w + kw
    return iy, ix, out_ok & (iy >= 0) & (iy < height) & (ix >= 0) & (ix < width)


@triton.jit
def _add_bias(acc, bias, offs, mask, has_bias):
    """acc + bias[offs] along the columns, in fp32; nothing when the bias is absent (``has_bias`` 0)."""
    if has_bias != 0:
        acc += tl.load(bias + offs, mask=mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _gemm_rows(acc, x_rows, rows_ok, x_sc, in_channels, w, w_sk, w_sn, offs_n, mask_n, BLOCK_K: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + X · W over ``in_channels``: X's rows are the pixels at the pointers ``x_rows`` (channel stride ``x_sc``;
    rows outside ``rows_ok`` read 0), W[k, n] is at ``w + k·w_sk + offs_n·w_sn``. See :func:`_dot_mode`."""
    for k0 in range(0, in_channels, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < in_channels
        a = tl.load(x_rows[:, None] + offs_k[None, :] * x_sc, mask=rows_ok[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w + offs_k[:, None] * w_sk + offs_n[None, :] * w_sn, mask=mask_k[:, None] & mask_n[None, :],
                    other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _depthwise_taps(x_img, x_sc, x_sh, x_sw, w, w_sc, w_skh, w_skw, offs_c, mask_c, out_y, out_x, out_ok, ksize,
                    stride_h, stride_w, pad_h, pad_w, height, width, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Σ over the k×k taps of x · w for (pixels × channels): ``x_img`` points at each output pixel's image, w[c, kh,
    kw] is at ``w + c·w_sc + kh·w_skh + kw·w_skw``; fp32."""
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for kh in range(0, ksize):
        for kw in range(0, ksize):
            iy, ix, inside = _tap(out_y, out_x, out_ok, kh, kw, stride_h, stride_w, pad_h, pad_w, height, width)
            xv = tl.load((x_img + iy * x_sh + ix * x_sw)[:, None] + offs_c[None, :] * x_sc,
                         mask=inside[:, None] & mask_c[None, :], other=0.0)
            wv = tl.load(w + offs_c * w_sc + kh * w_skh + kw * w_skw, mask=mask_c, other=0.0)
            acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
    return acc


@triton.jit
def _dot_on_chip(h, w_tile, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + h · w_tile, for an fp32 tile ``h`` computed on chip and a weight tile in the tensors' dtype: bf16 runs
    in fp32 (see :func:`_dot_mode`); fp16 rounds ``h`` to fp16 for the tensor cores, as eager stores it; fp32 keeps
    it as is."""
    if UPCAST:
        return tl.dot(h, w_tile.to(tl.float32), acc, input_precision=PRECISION)
    return tl.dot(h.to(w_tile.dtype), w_tile, acc, input_precision=PRECISION)


@triton.jit
def _epilogue(acc, bias, residual, out, offs_b, offs_h, offs_w, offs_c, mask_p, mask_c, has_bias, has_residual,
              r_sb, r_sc, r_sh, r_sw, o_sb, o_sc, o_sh, o_sw, ACTIVATION: tl.constexpr):
    """bias → activation → residual on the fp32 (pixels × channels) accumulator, then one rounding on store."""
    y = _activate(_add_bias(acc, bias, offs_c, mask_c, has_bias), ACTIVATION)
    mask = mask_p[:, None] & mask_c[None, :]
    if has_residual != 0:
        r_pixel = offs_b * r_sb + offs_h * r_sh + offs_w * r_sw
        y += tl.load(residual + r_pixel[:, None] + offs_c[None, :] * r_sc, mask=mask, other=0.0).to(tl.float32)
    o_pixel = offs_b * o_sb + offs_h * o_sh + offs_w * o_sw
    tl.store(out + o_pixel[:, None] + offs_c[None, :] * o_sc, y.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _conv_dw_kernel(x, weight, bias, residual, out, n_pixels, channels, height, width, out_height, out_width,
                    ksize, stride_h, stride_w, pad_h, pad_w, has_bias, has_residual,
                    x_sb, x_sc, x_sh, x_sw, w_sc, w_sh, w_sw, r_sb, r_sc, r_sh, r_sw, o_sb, o_sc, o_sh, o_sw,
                    ACTIVATION: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # flat (batch, out row, out column)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_p = offs_p < n_pixels
    mask_c = offs_c < channels
    offs_b, offs_h, offs_w = _pixel_coords(offs_p, out_height, out_width)
    acc = _depthwise_taps(x + offs_b * x_sb, x_sc, x_sh, x_sw, weight, w_sc, w_sh, w_sw, offs_c, mask_c, offs_h,
                          offs_w, mask_p, ksize, stride_h, stride_w, pad_h, pad_w, height, width, BLOCK_P, BLOCK_C)
    _epilogue(acc, bias, residual, out, offs_b, offs_h, offs_w, offs_c, mask_p, mask_c, has_bias, has_residual,
              r_sb, r_sc, r_sh, r_sw, o_sb, o_sc, o_sh, o_sw, ACTIVATION)


@triton.jit
def _conv_pw_kernel(x, weight, bias, residual, out, n_pixels, in_channels, out_channels, height, width,
                    has_bias, has_residual, x_sb, x_sc, x_sh, x_sw, w_sn, w_sk,
                    r_sb, r_sc, r_sh, r_sw, o_sb, o_sc, o_sh, o_sw,
                    ACTIVATION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # Output-channel blocks of one pixel block are neighbouring programs, so its x tile is read from HBM once
    # and then from L2.
    n_blocks = tl.cdiv(out_channels, BLOCK_N)
    pid_m = tl.program_id(0) // n_blocks
    pid_n = tl.program_id(0) % n_blocks
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < n_pixels
    mask_n = offs_n < out_channels
    offs_b, offs_h, offs_w = _pixel_coords(offs_m, height, width)
    x_rows = x + offs_b * x_sb + offs_h * x_sh + offs_w * x_sw
    acc = _gemm_rows(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), x_rows, mask_m, x_sc, in_channels, weight, w_sk,
                     w_sn, offs_n, mask_n, BLOCK_K, PRECISION, UPCAST)
    _epilogue(acc, bias, residual, out, offs_b, offs_h, offs_w, offs_n, mask_m, mask_n, has_bias, has_residual,
              r_sb, r_sc, r_sh, r_sw, o_sb, o_sc, o_sh, o_sw, ACTIVATION)


def _dot_mode(dtype: torch.dtype) -> dict:
    """How the 1×1 GEMM multiplies: fp32 in IEEE precision (no TF32 rounding of the inputs); fp16 on fp16 tensor
    cores; bf16 upcast to fp32 on TF32 tensor cores, exact for bf16 values (8-bit mantissas fit TF32's 10) and
    clear of the Triton interpreter's broken bf16 dot, so CI checks the arithmetic the GPU runs."""
    if dtype == torch.float32:
        return {"PRECISION": "ieee", "UPCAST": False}
    return {"PRECISION": "tf32", "UPCAST": dtype == torch.bfloat16}


def _optional(t: torch.Tensor | None, stand_in: torch.Tensor) -> tuple[torch.Tensor, int, tuple[int, ...]]:
    """(pointer, present flag, 4 strides) for an optional tensor; an absent one is never read."""
    if t is None:
        return stand_in, 0, (0, 0, 0, 0)
    return t, 1, t.stride()


def depthwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: list[int],
              padding: list[int], activation: str, residual: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """Writes ``act(depthwise_conv(x) + bias) + residual`` into ``out`` (B, C, H_out, W_out), any strides.
    ``weight`` is (C, 1, k, k)."""
    batch, channels, height, width = x.shape
    _, _, out_height, out_width = out.shape
    n_pixels = batch * out_height * out_width
    if out.numel() == 0:
        return out
    bias_t, has_bias, _ = _optional(bias, weight)
    residual_t, has_residual, r_strides = _optional(residual, out)
    grid = (triton.cdiv(n_pixels, DW_BLOCK_P), triton.cdiv(channels, DW_BLOCK_C))
    _conv_dw_kernel[grid](
        x, weight, bias_t, residual_t, out, n_pixels, channels, height, width, out_height, out_width,
        weight.shape[2], *stride, *padding, has_bias, has_residual,
        *x.stride(), weight.stride(0), weight.stride(2), weight.stride(3), *r_strides, *out.stride(),
        ACTIVATION=activation, BLOCK_P=DW_BLOCK_P, BLOCK_C=DW_BLOCK_C)
    return out


def pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str,
              residual: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """Writes ``act(conv1x1(x) + bias) + residual`` into ``out`` (B, C_out, H, W), any strides. ``weight`` is
    (C_out, C_in, 1, 1)."""
    batch, in_channels, height, width = x.shape
    out_channels = weight.shape[0]
    n_pixels = batch * height * width
    if out.numel() == 0:
        return out
    bias_t, has_bias, _ = _optional(bias, weight)
    residual_t, has_residual, r_strides = _optional(residual, out)
    grid = (triton.cdiv(n_pixels, PW_BLOCK_M) * triton.cdiv(out_channels, PW_BLOCK_N),)
    _conv_pw_kernel[grid](
        x, weight, bias_t, residual_t, out, n_pixels, in_channels, out_channels, height, width,
        has_bias, has_residual, *x.stride(), weight.stride(0), weight.stride(1), *r_strides, *out.stride(),
        ACTIVATION=activation, BLOCK_M=PW_BLOCK_M, BLOCK_N=PW_BLOCK_N, BLOCK_K=PW_BLOCK_K, **_dot_mode(x.dtype))
    return out


def compile_configs():
    """Every (kernel, signature, constexprs) the launchers above can request: CI compiles each one ahead of time
    for sm_90, so an error only the GPU compiler would raise fails there instead of on a user's GPU."""
    pointers = ("x", "weight", "bias", "residual", "out")
    blocks = {_conv_dw_kernel: {"BLOCK_P": DW_BLOCK_P, "BLOCK_C": DW_BLOCK_C},
              _conv_pw_kernel: {"BLOCK_M": PW_BLOCK_M, "BLOCK_N": PW_BLOCK_N, "BLOCK_K": PW_BLOCK_K}}
    for dtype, ptr in ((torch.float32, "*fp32"), (torch.float16, "*fp16"), (torch.bfloat16, "*bf16")):
        for activation in ACTIVATIONS:
            for kernel, block in blocks.items():
                constexprs = {"ACTIVATION": activation, **block}
                if kernel is _conv_pw_kernel:
                    constexprs.update(_dot_mode(dtype))
                signature = {name: ptr if name in pointers else "constexpr" if name in constexprs else "i32"
                             for name in kernel.arg_names}
                yield kernel, signature, constexprs
