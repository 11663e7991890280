"""What the Triton kernel files share: block sizes, the dot-product mode, the pointwise building blocks of the
conv kernels (activation, bias, pixel coordinates, taps, GEMM over channels, epilogue) and the signature builder
of the ahead-of-time sm_90 compile configurations. Kernel files import these and nothing of each other."""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Container, Iterable, Iterator

import torch
import triton
import triton.language as tl

from evit_kernels.dispatch import KERNEL_DTYPES
from evit_kernels.fp32_precision import tf32_allowed
from evit_kernels.predict import GPUS

POINTER_TYPES = {dtype: {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}[dtype]
                 for dtype in KERNEL_DTYPES}
"""The kernels' input dtypes (``dispatch.KERNEL_DTYPES``) and their Triton pointer types (the compile configurations
take one per dtype)."""


SMS = GPUS["h100"].sms
"""Streaming multiprocessors of the GPU the launch heuristics size their grids for, the performance model's H100
(the H200 has as many): a grid of fewer programs than this leaves SMs idle, so the kernels then take smaller
tiles."""


_ON_CHIP_GATHERS = contextvars.ContextVar("evit_kernels_on_chip_gathers", default=True)


def on_chip_gathers() -> bool:
    """Whether the launchers may stage their input on chip and gather from it (the default): the depthwise plane
    kernel and the linear attention's whole heads (their aggregated scales' taps too) load a small map's channels as
    one flat run in wide accesses, the row-staged 3×3 conv its input rows, and each gathers its taps or tiles from
    them (``tl.gather``). The performance model prices the wide loads but not the gathers' shared-memory traffic, so
    where they pay is for a GPU to settle (:func:`without_on_chip_gathers`)."""
    return _ON_CHIP_GATHERS.get()


@contextlib.contextmanager
def without_on_chip_gathers() -> Iterator[None]:
    """Inside the block the launchers take their tile kernels where they would gather on chip and a tile kernel takes
    the call (:func:`on_chip_gathers`; an image's 3×3 conv has only the row-staged kernel): the path
    ``benchmarks/released_ops.py`` times beside the chosen one."""
    token = _ON_CHIP_GATHERS.set(False)
    try:
        yield
    finally:
        _ON_CHIP_GATHERS.reset(token)


def cdiv(a: int, b: int) -> int:
    """``a / b`` rounded up, for the launchers' grids and tiles. Plain integer arithmetic on the host, as is
    :func:`next_power_of_2`: ``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions whose wrapper
    costs about 1.5 µs a call, a few hundred calls per model forward at batch 1."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ≥ ``n`` (≥ 1)."""
    return 1 << max(n - 1, 0).bit_length()


def dot_size(n: int) -> int:
    """``n`` padded to a block size ``tl.dot`` takes: a power of two, at least 16."""
    return max(16, next_power_of_2(n))


def dot_mode(dtype: torch.dtype, op: str) -> dict:
    """How a kernel multiplies tiles of ``dtype`` tensors where its products stand for PyTorch's ``op`` ("conv" or
    "matmul"): the ``PRECISION`` and ``UPCAST`` constexprs of :func:`mma`. fp16 and bf16 operands go to the tensor
    cores as they are, with fp32 accumulation. fp32 ones as PyTorch would run that op
    (:func:`evit_kernels.fp32_precision.tf32_allowed`): TF32 where it allows it (convolutions by default, matmuls
    after ``torch.set_float32_matmul_precision("high")``), IEEE fp32 otherwise. Under the Triton interpreter, whose
    bf16 dot is broken, bf16 operands are upcast to fp32 first (``UPCAST``): products of bf16 values are exact in
    fp32, so CI checks the values the tensor cores compute."""
    return {"PRECISION": "tf32" if dtype == torch.float32 and tf32_allowed(op) else "ieee",
            "UPCAST": dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"}


def compiled_dot_modes(dtype: torch.dtype) -> list[dict]:
    """Every :func:`dot_mode` a GPU launch on ``dtype`` tensors can take, whatever PyTorch's settings: the compile
    configurations build each one (fp32: IEEE and TF32)."""
    return [{"PRECISION": precision, "UPCAST": False}
            for precision in (("ieee", "tf32") if dtype == torch.float32 else ("ieee",))]


def optional(t: torch.Tensor | None, stand_in: torch.Tensor) -> tuple[torch.Tensor, int, tuple[int, ...]]:
    """(pointer, present flag, 4 strides) for an optional tensor; an absent one is never read."""
    if t is None:
        return stand_in, 0, (0, 0, 0, 0)
    return t, 1, t.stride()


RUNS = (16, 4)
"""The runs of adjacent elements a kernel can be told of (:func:`run_length`): every map of an even side has one
(16 for sides that are multiples of 4: 28×28, 56×56, 12×12; 4 for the others: 14×14, 10×10)."""


def run_length(block: int, n: int, steps: Iterable[int], strides: Iterable[int], index_proven: bool) -> int:
    """The longest run of :data:`RUNS` that divides ``block`` and ``n`` where every one of ``steps`` is 1 and every
    one of ``strides`` a multiple of it, unless the JIT proves it itself (:func:`unproven`, ``index_proven``); else
    1. For tiles of ``block`` indices (from a multiple of ``block``) along an axis of length ``n`` whose step is 1 in
    each tensor (``steps``), at any other indices of the tensors' ``strides``: then indices run·j … run·j + run - 1
    lie at adjacent elements from a multiple of run, and all on one side of ``n`` (a tile's mask is the same across
    them)."""
    if any(step != 1 for step in steps):
        return 1
    strides = tuple(strides)
    run = next((run for run in RUNS if block % run == 0 and n % run == 0 and all(s % run == 0 for s in strides)), 1)
    return unproven(run, index_proven)


def pixel_run(block: int, *maps: torch.Tensor) -> int:
    """:func:`run_length` of the pixels of the (B, C, H, W) tensors ``maps`` (the same shape: an output and its
    residual), numbered flat (image, row, column) as the conv kernels' tiles of ``block`` pixels take them: where
    each map's rows are dense (row stride W), a pixel's offset within its image is its index times the column stride,
    over H·W pixels. 1 where none holds (channels_last maps, odd sides), and where the JIT proves the runs itself
    (:func:`unproven`: W a multiple of 16)."""
    _, _, height, width = maps[0].shape
    steps = [t.stride(3) if height == 1 or t.stride(2) == width * t.stride(3) else 0 for t in maps]
    return run_length(block, height * width, steps, (s for t in maps for s in t.stride()[:2]), width % 16 == 0)


def unproven(run: int, index_proven: bool) -> int:
    """``run``, or 1 where the JIT proves runs of 16 itself: it specializes integer arguments that are multiples of
    16, so a run of 16 (every stride a multiple of 16) whose index arithmetic it can follow (``index_proven``: a
    token index, or a pixel's column within rows of a multiple of 16) is no news to it. The hint there would only
    lay the tile out anew (on SAM-L0's 16×16 maps 72 registers instead of 96, with the same 16-byte accesses), so
    those builds stay as they were."""
    return 1 if run == 16 and index_proven else run


def signature(kernel, pointer: str, constexprs: Container[str], pointers: Container[str],
              special: dict[str, str] | None = None) -> dict[str, str]:
    """Triton argument types of ``kernel`` for an ahead-of-time compile: the names in ``constexprs`` are
    constexprs, those in ``pointers`` tensors of pointer type ``pointer``, those in ``special`` the type it gives,
    and every other argument (sizes, strides, flags) i32, as the launchers pass them."""
    special = special or {}

    def kind(name: str) -> str:
        if name in constexprs:
            return "constexpr"
        if name in special:
            return special[name]
        return pointer if name in pointers else "i32"

    return {name: kind(name) for name in kernel.arg_names}


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a·b (fp32 ``acc``) for tiles from tensors of one dtype, as :func:`dot_mode` says: either operand may
    be an fp32 tile computed on chip, which is rounded to the other's dtype first (as eager stores its
    intermediates). fp32 tensors: fp32 operands at ``PRECISION``; fp16 and bf16: on the tensor cores."""
    if a.dtype == tl.float32 and b.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision=PRECISION)
    if UPCAST:
        return tl.dot(rounded(a, tl.bfloat16, UPCAST), rounded(b, tl.bfloat16, UPCAST), acc, input_precision="ieee")
    if a.dtype == tl.float32:
        a = a.to(b.dtype)
    else:
        b = b.to(a.dtype)
    return tl.dot(a, b, acc)


@triton.jit
def rounded(t, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """``t`` rounded to ``dtype`` to nearest even, as the GPU converts. Under the interpreter's bf16 (``UPCAST``),
    whose conversion truncates, the rounding is done on the fp32 bits and the tile stays fp32, holding bf16 values
    (storing it as bf16 is then exact)."""
    if UPCAST:
        bits = t.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    return t.to(dtype)


@triton.jit
def activate(y, ACTIVATION: tl.constexpr):
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
def pixel_coords(offs, height, width):
    """(batch, row, column) of the pixels numbered ``offs`` in a (B, ·, height, width) map."""
    hw = height * width
    return offs // hw, (offs % hw) // width, offs % width


@triton.jit
def tap(out_y, out_x, out_ok, kh, kw, stride_h, stride_w, pad_h, pad_w, height, width):
    """The input (row, column) that tap (kh, kw) of the outputs at (out_y, out_x) reads, and whether it lies in the
    map: taps in the zero padding read nothing."""
    iy = out_y * stride_h - pad_h + kh
    ix = out_x * stride_w - pad_w + kw
    return iy, ix, out_ok & (iy >= 0) & (iy < height) & (ix >= 0) & (ix < width)


@triton.jit
def outer(rows, cols, TRANSPOSED: tl.constexpr):
    """Two vectors broadcast to a 2-D tile: ``rows`` down its rows and ``cols`` along its columns, or, ``TRANSPOSED``,
    to the transposed tile (``rows`` along the columns). The tiles of the kernels' pixels × channels products and
    their transposes (channels × pixels: a product with fewer than 64 pixels keeps wgmma's 64 rows) share code by
    it."""
    if TRANSPOSED:
        down, along = rows[None, :], cols[:, None]
    else:
        down, along = rows[:, None], cols[None, :]
    return down, along


@triton.jit
def add_bias(acc, bias, offs, mask, has_bias, TRANSPOSED: tl.constexpr = False):
    """acc + bias[offs] along the columns (``TRANSPOSED``: down the rows), in fp32; nothing when the bias is absent
    (``has_bias`` 0)."""
    if has_bias != 0:
        b = tl.load(bias + offs, mask=mask, other=0.0).to(tl.float32)
        if TRANSPOSED:
            acc += b[:, None]
        else:
            acc += b[None, :]
    return acc


@triton.jit
def gemm_rows(acc, x_rows, rows_ok, x_sc, in_channels, w, w_sk, w_sn, offs_n, mask_n, BLOCK_K: tl.constexpr,
              PRECISION: tl.constexpr, UPCAST: tl.constexpr, TRANSPOSED: tl.constexpr = False):
    """acc + X · W over ``in_channels``: X's rows are the pixels at the pointers ``x_rows`` (channel stride ``x_sc``;
    rows outside ``rows_ok`` read 0), W[k, n] is at ``w + k·w_sk + offs_n·w_sn``; ``TRANSPOSED``: accᵀ + Wᵀ · Xᵀ
    (acc is N × pixels). See :func:`mma`."""
    for k0 in range(0, in_channels, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < in_channels
        pixel_at, channel_at = outer(x_rows, offs_k * x_sc, TRANSPOSED)
        pixel_ok, channel_ok = outer(rows_ok, mask_k, TRANSPOSED)
        x = tl.load(pixel_at + channel_at, mask=pixel_ok & channel_ok, other=0.0)
        k_at, n_at = outer(offs_k * w_sk, offs_n * w_sn, TRANSPOSED)
        k_ok, n_ok = outer(mask_k, mask_n, TRANSPOSED)
        w_tile = tl.load(w + k_at + n_at, mask=k_ok & n_ok, other=0.0)
        if TRANSPOSED:
            acc = mma(w_tile, x, acc, PRECISION=PRECISION, UPCAST=UPCAST)
        else:
            acc = mma(x, w_tile, acc, PRECISION=PRECISION, UPCAST=UPCAST)
    return acc


@triton.jit
def full_conv_taps(acc, x_img, x_sc, x_sh, x_sw, in_channels, w, w_sk, w_sn, w_skh, w_skw, offs_n, mask_n, out_y, out_x,
                   out_ok, KSIZE: tl.constexpr, stride_h, stride_w, pad_h, pad_w, height, width, BLOCK_K: tl.constexpr,
                   PRECISION: tl.constexpr, UPCAST: tl.constexpr, TRANSPOSED: tl.constexpr = False):
    """acc + the groups-1 KSIZE×KSIZE conv of the images at ``x_img`` (one per output pixel) at the output pixels
    (out_y, out_x), as an implicit GEMM: one product over the input channels per tap (:func:`gemm_rows`; acc is
    pixels × N, or N × pixels ``TRANSPOSED``). W[k, n] of tap (kh, kw) is at ``w + kh·w_skh + kw·w_skw + k·w_sk +
    offs_n·w_sn``."""
    for kh in range(0, KSIZE):
        for kw in range(0, KSIZE):
            iy, ix, inside = tap(out_y, out_x, out_ok, kh, kw, stride_h, stride_w, pad_h, pad_w, height, width)
            acc = gemm_rows(acc, x_img + iy * x_sh + ix * x_sw, inside, x_sc, in_channels, w + kh * w_skh + kw * w_skw,
                            w_sk, w_sn, offs_n, mask_n, BLOCK_K=BLOCK_K, PRECISION=PRECISION, UPCAST=UPCAST,
                            TRANSPOSED=TRANSPOSED)
    return acc


@triton.jit
def depthwise_taps(x_img, x_sc, x_sh, x_sw, w, w_sc, w_skh, w_skw, offs_c, mask_c, out_y, out_x, out_ok, ksize,
                   stride_h, stride_w, pad_h, pad_w, height, width, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Σ over the k×k taps of x · w for (pixels × channels): ``x_img`` points at each output pixel's image, w[c, kh,
    kw] is at ``w + c·w_sc + kh·w_skh + kw·w_skw``; fp32."""
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for kh in range(0, ksize):
        for kw in range(0, ksize):
            iy, ix, inside = tap(out_y, out_x, out_ok, kh, kw, stride_h, stride_w, pad_h, pad_w, height, width)
            xv = tl.load((x_img + iy * x_sh + ix * x_sw)[:, None] + offs_c[None, :] * x_sc,
                         mask=inside[:, None] & mask_c[None, :], other=0.0)
            wv = tl.load(w + offs_c * w_sc + kh * w_skh + kw * w_skw, mask=mask_c, other=0.0)
            acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
    return acc


@triton.jit
def epilogue(acc, bias, residual, out, offs_b, offs_h, offs_w, offs_c, mask_p, mask_c, has_bias, has_residual,
             r_sb, r_sc, r_sh, r_sw, o_sb, o_sc, o_sh, o_sw, ACTIVATION: tl.constexpr,
             TRANSPOSED: tl.constexpr = False, PIXEL_RUN: tl.constexpr = 1):
    """bias → activation → residual on the fp32 (pixels × channels) accumulator (``TRANSPOSED``: channels × pixels),
    then one rounding on store. ``PIXEL_RUN``: the caller's :func:`pixel_run` of the residual and the output (and
    the pixels are ``mask_p``'s: numbered flat, below B·H·W)."""
    y = activate(add_bias(acc, bias, offs_c, mask_c, has_bias, TRANSPOSED), ACTIVATION=ACTIVATION)
    mask = tile_mask(mask_p, mask_c, TRANSPOSED, PIXEL_RUN)
    if has_residual != 0:
        at = tile_pointers(residual, offs_b * r_sb + offs_h * r_sh + offs_w * r_sw, offs_c * r_sc, TRANSPOSED,
                           PIXEL_RUN)
        y += tl.load(at, mask=mask, other=0.0).to(tl.float32)
    at = tile_pointers(out, offs_b * o_sb + offs_h * o_sh + offs_w * o_sw, offs_c * o_sc, TRANSPOSED, PIXEL_RUN)
    tl.store(at, y.to(out.dtype.element_ty), mask=mask)


@triton.jit
def tile_pointers(base, pixel_at, channel_at, TRANSPOSED: tl.constexpr, PIXEL_RUN: tl.constexpr):
    """The pointers of a pixels × channels tile (``TRANSPOSED``: channels × pixels) from ``base`` and the pixels' and
    the channels' own offsets, telling the compiler that the pixels come in runs of ``PIXEL_RUN`` adjacent elements
    starting at multiples of ``PIXEL_RUN`` (:func:`run_length`): it can then store and load each run with one wide
    access, where from the strides alone (W not a multiple of 16, as on a 14×14 map) it keeps one address per
    element. The hint needs the offsets summed as integers; without a run the pointers are built step by step (pixel
    term, then channel term), as before the runs came in: summed first, conv_block's 512-wide depthwise build spills
    84–156 bytes under triton 3.6."""
    down, along = outer(pixel_at, channel_at, TRANSPOSED)
    if PIXEL_RUN == 1:
        return base + down + along
    at = down + along
    if TRANSPOSED:
        at = tl.max_contiguous(tl.multiple_of(at, [1, PIXEL_RUN]), [1, PIXEL_RUN])
    else:
        at = tl.max_contiguous(tl.multiple_of(at, [PIXEL_RUN, 1]), [PIXEL_RUN, 1])
    return base + at


@triton.jit
def tile_mask(pixel_ok, channel_ok, TRANSPOSED: tl.constexpr, PIXEL_RUN: tl.constexpr):
    """The mask of a tile as :func:`tile_pointers` lays it out, the same across each run of ``PIXEL_RUN`` pixels."""
    down, along = outer(pixel_ok, channel_ok, TRANSPOSED)
    mask = down & along
    if PIXEL_RUN > 1:
        if TRANSPOSED:
            mask = tl.max_constancy(mask, [1, PIXEL_RUN])
        else:
            mask = tl.max_constancy(mask, [PIXEL_RUN, 1])
    return mask
