"""Triton kernel of ``evit::ffn`` (inference): the whole EfficientViT-M feed-forward block

    out = conv1x1(relu(conv1x1(x, w1) + b1), w2) + b2 + residual

in one pass. Each program owns a tile of BLOCK_M pixels × all C output channels and walks the hidden dimension in
chunks of BLOCK_H: the chunk h = relu(X·W1_chunkᵀ + b1_chunk) is computed in fp32 and immediately consumed by
acc += h·W2_chunkᵀ, so the (B, hidden, H, W) activation that eager writes and re-reads (twice the block's input
size, docs/performance.md, "Minimum traffic") never leaves the chip. The first GEMM walks C_in in BLOCK_K slices
(x re-reads hit L1/L2) so
that registers stay bounded for wide blocks. Tensors are read and written through their four strides (NCHW,
channels_last or any other layout); offsets are 32-bit, which the op's backend checks
(``dispatch.Backend.int32_offsets``).
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from evit_kernels.triton import _common as common
from evit_kernels.triton import split_sum

if TYPE_CHECKING:
    from evit_kernels.ops.ffn import FfnArgs

MAX_CHANNELS = 512
"""Widest block the kernel holds on chip (the released EfficientViT-M models' widest is 384)."""


def blocks(block_c: int, dtype: torch.dtype) -> dict[str, int]:
    """BLOCK_M / BLOCK_H / BLOCK_K, num_warps and maxnreg for a padded width and dtype: tiles that compile for sm_90
    without register spills under triton 3.6 and 3.8 (the fp32 accumulator alone is BLOCK_M × BLOCK_C). fp32 runs
    IEEE dots on FMA units, which hold every operand in registers, hence its small tiles. The widest block and the
    fp16/bf16 128-wide one (64-pixel tiles) take 8 warps, and blocks of 256 and 512 channels 16 hidden channels a
    step: otherwise their accumulator and w2 tile spill under triton 3.6. ``maxnreg`` 255 (the hardware's limit,
    given to ptxas): without it ptxas caps some of these at 128 registers under triton 3.8 and spills 8–24 B to fit
    more CTAs on an SM."""
    low_precision = dtype != torch.float32
    eight = block_c == MAX_CHANNELS or (low_precision and block_c == WGMMA_BLOCK_C)
    warps = {"num_warps": 8 if eight else 4, "maxnreg": 255}
    if not low_precision:
        return {"BLOCK_M": 16, "BLOCK_H": 16, "BLOCK_K": 16, **warps}
    return {"BLOCK_M": _LOW_PRECISION_BLOCK_M[block_c], "BLOCK_H": 16 if block_c >= 256 else 32, "BLOCK_K": 32,
            **warps}


PADDED_WIDTHS = (16, 32, 64, 128, 256, 512)
_LOW_PRECISION_BLOCK_M = {16: 64, 32: 64, 64: 64, 128: 64, 512: 16}  # 256: two 128-wide blocks (output_block)
WGMMA_BLOCK_C = 128
"""The widest output-channel block whose fp16/bf16 tiles hold 64 pixels, wgmma's smallest product (with 8 warps;
wider blocks' 64-pixel tiles spill). A 256-wide block is split in two such blocks (:func:`output_block`)."""


def output_block(channels: int, n_pixels: int, dtype: torch.dtype) -> int:
    """The output channels a program holds: all of them where they fit one block, except that in fp16/bf16 256
    padded channels take two blocks of :data:`WGMMA_BLOCK_C`, each program recomputing its pixels' hidden tile (1.5×
    the block's FLOPs, on wgmma instead of mma.sync at 32-pixel tiles), and that a small grid splits them in
    :data:`SMALL_GRID_BLOCK_C`: with fewer pixel tiles than the GPU has SMs (``common.SMS``), each program
    recomputes the hidden tile of its pixels (cheap on maps this small), so that a batch-1 layer (a 7×7 to 14×14
    map: one to seven pixel tiles) does not leave nearly every SM idle."""
    block_c = common.dot_size(channels)
    if dtype != torch.float32 and block_c == 2 * WGMMA_BLOCK_C:
        block_c = WGMMA_BLOCK_C
    if common.cdiv(n_pixels, blocks(block_c, dtype)["BLOCK_M"]) < common.SMS:
        block_c = min(block_c, SMALL_GRID_BLOCK_C)
    return block_c
SMALL_GRID_BLOCK_C = 64
SPLIT_MIN_HIDDEN = 512
"""The fewest hidden channels of a block whose few programs split them (see :func:`hidden_splits`)."""
SPLIT_MIN_STEPS = 2
"""The fewest steps of ``BLOCK_H`` hidden channels in each slice of a split block."""


def hidden_splits(programs: int, hidden: int, block_h: int) -> int:
    """Into how many slices the hidden channels are split (:func:`split_sum.slices`): where the ``programs`` are
    fewer than the GPU's SMs and there are at least :data:`SPLIT_MIN_HIDDEN` hidden channels, slices of at least
    :data:`SPLIT_MIN_STEPS` steps of ``block_h``. Each slice computes its hidden channels and their share
    of the output; the slices' sums are added, with b2 and the residual, by a second launch. The M-series' stage-2
    and stage-3 blocks at batch 1 are the case (16 to 49 pixels: one pixel tile × 4 to 6 output blocks, each
    program walking 512 to 768 hidden channels while over a hundred SMs idle)."""
    return split_sum.slices(programs, hidden, block_h, SPLIT_MIN_HIDDEN, SPLIT_MIN_STEPS)


@triton.jit
def _ffn_fwd_kernel(x, w1, b1, w2, b2, residual, out, n_pixels, channels, hidden, height, width,
                    has_b1, has_b2, has_residual, h_split, x_sb, x_sc, x_sh, x_sw, w1_sh, w1_sc, w2_sc, w2_sh,
                    r_sb, r_sc, r_sh, r_sw, o_ss, o_sb, o_sc, o_sh, o_sw,
                    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                    PRECISION: tl.constexpr, UPCAST: tl.constexpr, SPLIT_H: tl.constexpr, PIXEL_RUN: tl.constexpr):
    # ``SPLIT_H``: the hidden channels split in slices of ``h_split`` (grid axis 2, a whole number of BLOCK_H steps);
    # each slice writes its sums to its own copy of the output, ``o_ss`` apart (the launcher then passes no b2 and
    # no residual); unsplit builds are the ones without it. ``PIXEL_RUN``: :func:`common.pixel_run` of the output (or
    # the partial sums) and the residual.
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_m = offs_m < n_pixels
    mask_c = offs_c < channels
    offs_b, offs_y, offs_x = common.pixel_coords(offs_m, height, width)
    x_rows = x + offs_b * x_sb + offs_y * x_sh + offs_x * x_sw
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    h_begin = 0
    h_end = hidden
    if SPLIT_H:
        h_begin = tl.program_id(2) * h_split
        h_end = tl.minimum(hidden, h_begin + h_split)
        out += tl.program_id(2) * o_ss
    for h0 in range(h_begin, h_end, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < hidden
        h = common.gemm_rows(tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32), x_rows, mask_m, x_sc, channels, w1, w1_sc,
                             w1_sh, offs_h, mask_h, BLOCK_K=BLOCK_K, PRECISION=PRECISION, UPCAST=UPCAST)
        h = common.add_bias(h, b1, offs_h, mask_h, has_b1)
        h = tl.where(h < 0, 0.0, h)  # ReLU that keeps NaN, as torch's; padded hidden columns are 0 and add nothing
        w2_tile = tl.load(w2 + offs_h[:, None] * w2_sh + offs_c[None, :] * w2_sc,
                          mask=mask_h[:, None] & mask_c[None, :], other=0.0)
        acc = common.mma(h, w2_tile, acc, PRECISION=PRECISION, UPCAST=UPCAST)
    common.epilogue(acc, b2, residual, out, offs_b, offs_y, offs_x, offs_c, mask_m, mask_c, has_b2, has_residual,
                    r_sb, r_sc, r_sh, r_sw, o_sb, o_sc, o_sh, o_sw, ACTIVATION="none", PIXEL_RUN=PIXEL_RUN)


def forward(a: FfnArgs, out: torch.Tensor) -> torch.Tensor:
    """Writes the block's output into ``out`` (B, C, H, W), any strides. ``w1`` is (hidden, C, 1, 1), ``w2``
    (C, hidden, 1, 1); C must be at most :data:`MAX_CHANNELS`."""
    batch, channels, height, width = a.x.shape
    hidden = a.w1.shape[0]
    n_pixels = batch * height * width
    b1, has_b1, _ = common.optional(a.b1, a.w1)
    b2, has_b2, _ = common.optional(a.b2, a.w2)
    residual, has_residual, r_strides = common.optional(a.residual, out)
    block_c = output_block(channels, n_pixels, a.x.dtype)
    sizes = blocks(block_c, a.x.dtype)
    grid = (common.cdiv(n_pixels, sizes["BLOCK_M"]), common.cdiv(channels, block_c))
    splits = hidden_splits(grid[0] * grid[1], hidden, sizes["BLOCK_H"])
    weights = (a.w1.stride(0), a.w1.stride(1), a.w2.stride(0), a.w2.stride(1))
    options = {"BLOCK_C": block_c, **sizes, **common.dot_mode(a.x.dtype, "conv")}
    if splits == 1:
        _ffn_fwd_kernel[grid](
            a.x, a.w1, b1, a.w2, b2, residual, out, n_pixels, channels, hidden, height, width,
            has_b1, has_b2, has_residual, hidden, *a.x.stride(), *weights, *r_strides, 0, *out.stride(), **options,
            SPLIT_H=False, PIXEL_RUN=common.pixel_run(sizes["BLOCK_M"], out, residual))
        return out
    sums = split_sum.partials(out, splits)
    _ffn_fwd_kernel[(*grid, splits)](
        a.x, a.w1, b1, a.w2, b2, residual, sums, n_pixels, channels, hidden, height, width,
        has_b1, 0, 0, split_sum.slice_length(hidden, sizes["BLOCK_H"], splits), *a.x.stride(), *weights, 0, 0, 0, 0,
        batch * sums.stride(0), *sums.stride(), **options, SPLIT_H=True,
        PIXEL_RUN=common.pixel_run(sizes["BLOCK_M"], sums))
    return split_sum.add(sums, a.b2, a.residual, out, "none")


def compile_configs():
    """Every (kernel, signature, constexprs, options) the launcher above can request: CI compiles each one ahead of
    time for sm_90, so an error only the GPU compiler would raise fails there instead of on a user's GPU."""
    pointers = ("x", "w1", "b1", "w2", "b2", "residual", "out")
    for dtype, ptr in common.POINTER_TYPES.items():
        for block_c in PADDED_WIDTHS:
            if dtype != torch.float32 and block_c not in _LOW_PRECISION_BLOCK_M:
                continue
            sizes = blocks(block_c, dtype)
            options = {"num_warps": sizes.pop("num_warps"), "maxnreg": sizes.pop("maxnreg")}
            runs = (1, *(run for run in common.RUNS if sizes["BLOCK_M"] % run == 0))
            for mode, run in itertools.product(common.compiled_dot_modes(dtype), runs):
                constexprs = {"BLOCK_C": block_c, **sizes, **mode, "SPLIT_H": False, "PIXEL_RUN": run}
                yield _ffn_fwd_kernel, common.signature(_ffn_fwd_kernel, ptr, constexprs, pointers), constexprs, options
                if block_c <= SMALL_GRID_BLOCK_C:  # a small grid's split hidden channels
                    constexprs = {**constexprs, "SPLIT_H": True}
                    yield (_ffn_fwd_kernel, common.signature(_ffn_fwd_kernel, ptr, constexprs, pointers,
                                                             special={"out": "*fp32"}), constexprs, options)
