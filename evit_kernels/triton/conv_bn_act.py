"""Triton kernels of ``evit::conv_bn_act`` (inference) for the convolutions that make up EfficientViT's conv
stacks: the depthwise k×k conv (k = 3, 5, 7; stride 1 or 2), the groups-1 conv (1×1, and 3×3) as an implicit
GEMM, and the groups-1 3×3 conv of image stems (RGB input; the stems' wide NCHW maps) with its input rows staged
whole. Each computes

    out = act(conv2d(x, weight) + bias) + residual

in one pass (the depthwise kernel also in GLUMBConv's GLU mode, gating half its channels by the other half as it
writes: ``_conv_dw_kernel``): the conv accumulates in fp32, and bias, activation and residual are applied to the fp32
accumulator before the single rounding to the output dtype, so the per-layer intermediates eager writes and
re-reads (docs/performance.md, "Why the workload is memory bound") never leave the chip. Every tensor is read in
place through its four strides (NCHW,
channels_last or any other layout) and the output is written through the strides of the tensor the caller
allocates, so the op keeps its single layout rule. Offsets are 32-bit: the op's backend checks every tensor's span.

Bias and residual are optional at run time (a uniform branch per program), not as constexprs: that keeps the
compiled variants to kernel × dtype × activation.
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
    from evit_kernels.ops.conv_bn_act import ConvBnActArgs

# Depthwise: a tile of output pixels × channels per program, each k×k tap one masked 2D load.
DW_BLOCKS = {"BLOCK_P": 64, "BLOCK_C": 32, "num_warps": 4}
DW_SMALL_GRID_BLOCKS = {"BLOCK_P": 16, "BLOCK_C": 32, "num_warps": 8}
DW_PLANE_PIXELS = 64
"""The largest channel plane (H·W) the depthwise plane kernel takes whole (see :func:`dw_planes`)."""
DW_PLANE_CHANNELS = (32, 8)
"""Channel planes per program of the depthwise plane kernel: 32, or 8 where 32 would make fewer programs than SMs
(see :func:`dw_planes`)."""
# Groups 1 (1×1 and k×k): a (pixels × output channels) tile of the GEMM (B·H·W) × C_out × (C_in·k²) per program.
DENSE_BLOCKS = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}
DENSE_SMALL_GRID_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64}
DENSE_MEMORY_BOUND_FLOPS_PER_BYTE = 250
"""The most FLOPs per byte moved (the conv's products over its input, weights and output) at which a groups-1 conv
whose regular tiles make well under a wave takes the quarter-size tiles (see :func:`dense_blocks`): about the ridge
of the regular tiles' wgmma on an H100 (989 TFLOP/s · 0.7 over 3.35 TB/s · 0.85, 243 FLOPs per byte), below which
those are bound by their traffic too, so that what decides is how much of the GPU the programs fill. It was 160
(1.3 times the quarter tiles' mma.sync ridge) while the regular build on 14×14 NCHW maps took 222 registers, 2 CTAs
per SM: its few programs then filled the SMs' slots as well as four times as many quarter ones (docs/performance.md,
"Runs of adjacent pixels on NCHW maps")."""
DENSE_WGMMA_SPLIT_MIN_SLICE = 512
"""The fewest input channels in each slice of a split on the regular tiles for which a 1×1 conv bound by its products
keeps those tiles (wgmma) on fewer of them than SMs instead of taking the quarter-size ones (mma.sync; see
:func:`dense_blocks`): a slice's products per output (2 × 512 FLOPs) then outweigh its fp32 partial sum's round trip
(8 bytes) by more than the quarter tiles' ridge (about 122 FLOPs per byte). Predicted (H100, bf16): SAM-L0 at batch
4, its 3072 → 512 projections on 1024 pixels (16 × 8 regular tiles, 4 slices of 768) 27.0 µs on quarter tiles,
11.5 + 7.4 µs (the sum) split; SAM-L0 at batch 4's 1024 → 512 attention projections (4 slices of 256) 11.0 and 8.7 +
7.4 µs. (L3's 2048 → 256 projections on 28 × 28 at batch 1, 224 px, 10 slices of 224: 15.8 µs on quarter tiles,
10.9 + 6.2 µs split, were the other example until :data:`DENSE_MEMORY_BOUND_FLOPS_PER_BYTE` went to 250: at 176
FLOPs per byte they now take the quarter tiles by that rule.)"""
DENSE_SPLIT_MIN_CHANNELS = 768
"""The shortest reduction (input channels) a 1×1 conv on few tiles is split over (see :func:`dense_splits`)."""
DENSE_SPLIT_MIN_STEPS = 4
"""The fewest steps of ``BLOCK_K`` input channels in each slice of a split 1×1 conv."""
DENSE_SPLIT_LONG_CHANNELS = 4096
"""The shortest reduction over which a 1×1 conv on up to twice as many tiles as the GPU has SMs is split too (see
:func:`dense_splits`)."""
DENSE_KERNEL_SIZES = (1, 3)
"""The kernel sizes of the groups-1 convs: 1×1 (stride 1, no padding) and 3×3 (the M-series stem)."""
DENSE_MIN_TAP_CHANNELS = 16
"""The fewest input channels the groups-1 kernel takes for a 3×3 conv: each tap is one product over the input
channels in steps of 32, so an RGB stem (3 channels) would execute ten times its FLOPs; it runs on the row-staged
kernel."""


ROWS_BLOCK_P = 128
"""Outputs of one output row per program of the row-staged 3×3 kernel (wider rows take several programs)."""
ROWS_BLOCK_N = 32
"""Output channels per program of the row-staged kernel (the released stems make 16 or 32)."""
ROWS_PAIRS = 16
"""(input channel, kernel row) pairs per step of the row-staged kernel, the K of its products: one step for an RGB
image (9 pairs), 6 for 32 channels."""
ROWS_MIN_OUT_WIDTH = 96
"""The narrowest output rows the row-staged kernel takes a conv of more than ``ROWS_PAIRS // 3`` input channels for:
narrower rows leave most of its 128 outputs per program idle (the L-series and SAM stems' 112- and 256-wide rows
take it; the M-series stem's 56-wide and narrower ones stay on the implicit GEMM)."""


def dense_blocks(n_pixels: int, out_channels: int, in_channels: int, ksize: int,
                 flops_per_byte: float) -> dict[str, int]:
    """The tile sizes of the groups-1 kernel for a GEMM of ``n_pixels`` × ``out_channels`` outputs over
    ``in_channels`` of a ``ksize`` × ``ksize`` conv making ``flops_per_byte`` FLOPs per byte it moves. Quarter-size
    output tiles, so that four times as many programs share the GEMM, each with half the steps over the input
    channels (docs/performance.md, "Smaller tiles"):

    - a k×k conv, where the regular tiles make fewer programs than the GPU has SMs (``common.SMS``). Not on more:
      only 2 of its quarter-tile programs fit an SM.
    - a 1×1 conv bound by its memory traffic on the regular tiles' wgmma (at most
      :data:`DENSE_MEMORY_BOUND_FLOPS_PER_BYTE`), where the regular tiles make well under a wave (fewer than
      3 × ``common.SMS`` programs; 2 to 10 fit an SM): the slower instruction then costs little while the programs
      fill the SMs. L3's 1024 → 6144 expands at batch 1 on a 10×10 or 12×12 map are the case (192 or 288 regular
      programs streaming a 12.6 MB weight, 90 or 124 FLOPs per byte; predicted 16.5 → 9.8 µs on the 10×10 map), and
      L2's 1024 → 256 projections at batch 16 (196 regular programs, 192 FLOPs per byte); SAM-L0's fp32 attention
      projection at batch 16 is not (512 regular programs, a wave at 4 per SM).
    - a 1×1 conv bound by its products, where the regular tiles make fewer programs than SMs, unless their split
      over the input channels (:func:`dense_splits`) leaves slices of at least :data:`DENSE_WGMMA_SPLIT_MIN_SLICE`
      channels: then the regular tiles keep wgmma (twice mma.sync's rate) and the split fills the SMs."""
    regular = common.cdiv(n_pixels, DENSE_BLOCKS["BLOCK_M"]) * common.cdiv(out_channels, DENSE_BLOCKS["BLOCK_N"])
    if ksize == 1 and flops_per_byte <= DENSE_MEMORY_BOUND_FLOPS_PER_BYTE:
        quarter = regular < 3 * common.SMS
    elif ksize == 1 and regular < common.SMS:
        splits = dense_splits(regular, in_channels, DENSE_BLOCKS)
        quarter = splits == 1 or \
            split_sum.slice_length(in_channels, DENSE_BLOCKS["BLOCK_K"], splits) < DENSE_WGMMA_SPLIT_MIN_SLICE
    else:
        quarter = regular < common.SMS
    return DENSE_SMALL_GRID_BLOCKS if quarter else DENSE_BLOCKS


def dw_blocks(n_pixels: int, channels: int) -> dict[str, int]:
    """The tile and warps of the depthwise kernel for ``n_pixels`` × ``channels`` outputs: where the regular tiles
    make fewer programs than the GPU has SMs (a batch-1 layer on a 7×7 to 28×28 map, 16 to 104 programs of 16
    outputs per thread), a quarter of the pixels per program on twice the warps, two outputs per thread: up to four
    times the programs, and eight times the threads with loads in flight. Not where every pixel fits one small tile
    (a 4×4 map at batch 1): the programs would be as few, each with fewer registers, so more of them would share an
    SM (docs/performance.md, "Small grids")."""
    regular = common.cdiv(n_pixels, DW_BLOCKS["BLOCK_P"]) * common.cdiv(channels, DW_BLOCKS["BLOCK_C"])
    small_gains = n_pixels > DW_SMALL_GRID_BLOCKS["BLOCK_P"]
    return DW_SMALL_GRID_BLOCKS if regular < common.SMS and small_gains else DW_BLOCKS


def dw_planes(a: ConvBnActArgs, out: torch.Tensor) -> int | None:
    """The channel planes per program of the depthwise plane kernel for this conv, or None where it does not take
    it. It takes a stride-1 conv that keeps the map's size, with x, the output and the residual dense NCHW, on maps of
    at most :data:`DW_PLANE_PIXELS` pixels: each program reads its image's planes as one flat run, in wide accesses
    wherever the run starts aligned (every plane count of a 7×7 map of a multiple of 16 channels), where the
    tile kernel, on a map whose side is odd, reads each tap and writes each output 2 bytes at a time (no two
    adjacent pixels of a plane start at an aligned address). None too outside :func:`common.on_chip_gathers`."""
    batch, channels, height, width = out.shape
    kernel = a.weight.shape[2]
    same = tuple(a.stride) == (1, 1) and tuple(a.padding) == (kernel // 2, kernel // 2) and \
        tuple(a.x.shape) == tuple(out.shape)
    dense = all(t.is_contiguous() for t in (a.x, out) + (() if a.residual is None else (a.residual,)))
    if not (same and dense and height * width <= DW_PLANE_PIXELS and common.on_chip_gathers()):
        return None
    wide, narrow = DW_PLANE_CHANNELS
    return wide if batch * common.cdiv(channels, wide) >= common.SMS else narrow


def dense_splits(tiles: int, in_channels: int, blocks: dict[str, int]) -> int:
    """Into how many slices a 1×1 conv's reduction over ``in_channels`` is split (split-K, :func:`split_sum.slices`):
    where its ``tiles`` output tiles are fewer than the GPU's SMs while each walks a reduction of at least
    :data:`DENSE_SPLIT_MIN_CHANNELS`, in slices of at least :data:`DENSE_SPLIT_MIN_STEPS` steps of ``BLOCK_K`` of
    its tile sizes ``blocks``, up to :data:`split_sum.TARGET_PER_SM` programs per SM.
    Batch-1 projections on 7×7 and 14×14 maps are the case (49 pixels × 512 outputs from 3072 channels: 32 tiles of
    32 × 32, each streaming a 3072-long column of the weights while a hundred SMs idle; 196 × 256 from 1024: 56
    tiles; 196 × 512 from 4096: 112 tiles, split 4 ways). Up to twice as many tiles as SMs where the reduction is
    at least :data:`DENSE_SPLIT_LONG_CHANNELS` long: such a launch still fills few of the SMs' slots (2 to 6
    programs of 32 × 32 fit an SM), and each program's walk is long enough for a split to repay the summing launch
    (L3's 6144 → 1024 projections on its 12×12 map at 384 px, batch 1: 160 tiles of 96 steps); over a shorter one it
    does not (L3's 1024-channel qkv conv at 224 px: 192 tiles of 16 steps, priced 1.4 µs slower split)."""
    max_tiles = (2 if in_channels >= DENSE_SPLIT_LONG_CHANNELS else 1) * common.SMS
    return split_sum.slices(tiles, in_channels, blocks["BLOCK_K"], DENSE_SPLIT_MIN_CHANNELS, DENSE_SPLIT_MIN_STEPS,
                            max_tiles)


def dense_warps(dtype: torch.dtype, ksize: int, blocks: dict[str, int] = DENSE_BLOCKS) -> int:
    """4 warps, 8 for fp32 k×k convs (whose FMA products spill the registers of 4 warps on sm_90; the row-staged
    kernel's too, under triton 3.6) and on the quarter-size tiles ``blocks`` of small grids: there the programs are
    fewer than the SMs' slots, so each program's own loads in flight set the pace, and 8 warps keep twice as many
    (one 16 × 8 product each on a 32×32 tile). The formula sees it as the builds' CTAs per SM halving; predicted
    (H100, bf16, batch 1): B1 1.73× → 1.85×, L3 1.46× → 1.48×, with no fused module slower than eager left in either
    (docs/performance.md, "Smaller tiles")."""
    return 8 if blocks == DENSE_SMALL_GRID_BLOCKS or (dtype == torch.float32 and ksize > 1) else 4


@triton.jit
def _conv_dw_kernel(x, weight, bias, residual, out, n_pixels, channels, height, width, out_height, out_width,
                    ksize, stride_h, stride_w, pad_h, pad_w, has_bias, has_residual, gate_offset,
                    x_sb, x_sc, x_sh, x_sw, w_sc, w_sh, w_sw, r_sb, r_sc, r_sh, r_sw, o_sb, o_sc, o_sh, o_sw,
                    ACTIVATION: tl.constexpr, GATE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                    PIXEL_RUN: tl.constexpr):
    # ``GATE`` (an activation name, or None): the GLU mode of GLUMBConv. Output channel c is then
    # act(conv_c) · GATE(act(conv_{c + gate_offset})): the program computes both halves' taps for its channels and
    # writes their product, so the conv's 2·channels outputs never reach memory (no residual in this mode).
    # ``PIXEL_RUN``: :func:`common.pixel_run` of the output and the residual.
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # flat (batch, out row, out column)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_p = offs_p < n_pixels
    mask_c = offs_c < channels
    offs_b, offs_h, offs_w = common.pixel_coords(offs_p, out_height, out_width)
    x_img = x + offs_b * x_sb
    acc = common.depthwise_taps(x_img, x_sc, x_sh, x_sw, weight, w_sc, w_sh, w_sw, offs_c, mask_c, offs_h, offs_w,
                                mask_p, ksize, stride_h, stride_w, pad_h, pad_w, height, width, BLOCK_P=BLOCK_P,
                                BLOCK_C=BLOCK_C)
    if GATE is not None:
        offs_g = offs_c + gate_offset
        gate = common.depthwise_taps(x_img, x_sc, x_sh, x_sw, weight, w_sc, w_sh, w_sw, offs_g, mask_c, offs_h,
                                     offs_w, mask_p, ksize, stride_h, stride_w, pad_h, pad_w, height, width,
                                     BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C)
        gate = common.activate(common.add_bias(gate, bias, offs_g, mask_c, has_bias), ACTIVATION=ACTIVATION)
        acc = common.activate(common.add_bias(acc, bias, offs_c, mask_c, has_bias), ACTIVATION=ACTIVATION)
        common.epilogue(acc * common.activate(gate, ACTIVATION=GATE), bias, residual, out, offs_b, offs_h, offs_w,
                        offs_c, mask_p, mask_c, 0, 0, r_sb, r_sc, r_sh, r_sw, o_sb, o_sc, o_sh, o_sw,
                        ACTIVATION="none", PIXEL_RUN=PIXEL_RUN)
    else:
        common.epilogue(acc, bias, residual, out, offs_b, offs_h, offs_w, offs_c, mask_p, mask_c, has_bias,
                        has_residual, r_sb, r_sc, r_sh, r_sw, o_sb, o_sc, o_sh, o_sw, ACTIVATION=ACTIVATION,
                        PIXEL_RUN=PIXEL_RUN)


@triton.jit
def _conv_dw_planes_kernel(x, weight, bias, residual, out, channels, plane, height, width, ksize, pad, image,
                           has_bias, has_residual, w_sc, w_skh, w_skw, ACTIVATION: tl.constexpr,
                           BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    # The depthwise conv of :func:`dw_planes`' maps: program (b, j) takes channel planes [j·BLOCK_C, (j+1)·BLOCK_C) of
    # image b whole, one dense run of x (``image`` elements an image, ``plane`` = H·W a plane, at most BLOCK_P),
    # loaded flat; each tap is gathered from it on chip (zero across the map's border), the output is written and the
    # residual read flat, at the same offsets.
    first = tl.program_id(1) * BLOCK_C
    at = tl.program_id(0) * image + first * plane
    flat = tl.arange(0, BLOCK_C * BLOCK_P)
    valid = flat < tl.minimum(channels - first, BLOCK_C) * plane
    run = tl.load(x + at + flat, mask=valid, other=0.0)
    offs_c = first + flat // plane
    pixel = flat % plane
    y = pixel // width
    x_ = pixel % width
    acc = tl.zeros((BLOCK_C * BLOCK_P,), dtype=tl.float32)
    for kh in range(0, ksize):
        for kw in range(0, ksize):
            iy = y + kh - pad
            ix = x_ + kw - pad
            inside = valid & (iy >= 0) & (iy < height) & (ix >= 0) & (ix < width)
            taps = tl.gather(run, tl.where(inside, flat + (kh - pad) * width + (kw - pad), 0), 0)
            w = tl.load(weight + offs_c * w_sc + kh * w_skh + kw * w_skw, mask=valid, other=0.0)
            acc += tl.where(inside, taps.to(tl.float32), 0.0) * w.to(tl.float32)
    if has_bias != 0:
        acc += tl.load(bias + offs_c, mask=valid, other=0.0).to(tl.float32)
    acc = common.activate(acc, ACTIVATION=ACTIVATION)
    if has_residual != 0:
        acc += tl.load(residual + at + flat, mask=valid, other=0.0).to(tl.float32)
    tl.store(out + at + flat, acc.to(out.dtype.element_ty), mask=valid)


@triton.jit
def _conv_dense_kernel(x, weight, bias, residual, out, n_pixels, in_channels, out_channels, height, width,
                       out_height, out_width, stride_h, stride_w, pad_h, pad_w, has_bias, has_residual, k_split,
                       x_sb, x_sc, x_sh, x_sw, w_sn, w_sk, w_skh, w_skw, r_sb, r_sc, r_sh, r_sw,
                       o_ss, o_sb, o_sc, o_sh, o_sw,
                       ACTIVATION: tl.constexpr, KSIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, SPLIT_K: tl.constexpr,
                       PIXEL_RUN: tl.constexpr):
    # Output-channel blocks of one pixel block are neighbouring programs, so its x tile is read from HBM once
    # and then from L2. ``SPLIT_K``: a 1×1 conv split over its input channels (grid axis 1, ``k_split`` channels
    # per slice) writes each slice's sums to its own copy of the output, ``o_ss`` apart (the launcher then passes
    # no bias, no residual and no activation); unsplit builds are the ones without it. ``PIXEL_RUN``:
    # :func:`common.pixel_run` of the output (or the partial sums) and the residual.
    n_blocks = tl.cdiv(out_channels, BLOCK_N)
    pid_m = tl.program_id(0) // n_blocks
    pid_n = tl.program_id(0) % n_blocks
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < n_pixels
    mask_n = offs_n < out_channels
    offs_b, offs_h, offs_w = common.pixel_coords(offs_m, out_height, out_width)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SPLIT_K:  # 1×1 (see above)
        k_start = tl.program_id(1) * k_split
        x_rows = x + offs_b * x_sb + offs_h * x_sh + offs_w * x_sw + k_start * x_sc
        acc = common.gemm_rows(acc, x_rows, mask_m, x_sc, tl.minimum(in_channels - k_start, k_split),
                               weight + k_start * w_sk, w_sk, w_sn, offs_n, mask_n, BLOCK_K=BLOCK_K,
                               PRECISION=PRECISION, UPCAST=UPCAST)
        out += tl.program_id(1) * o_ss
    elif KSIZE == 1:  # 1×1, stride 1, no padding: each output pixel's own input pixel
        x_rows = x + offs_b * x_sb + offs_h * x_sh + offs_w * x_sw
        acc = common.gemm_rows(acc, x_rows, mask_m, x_sc, in_channels, weight, w_sk, w_sn, offs_n, mask_n,
                               BLOCK_K=BLOCK_K, PRECISION=PRECISION, UPCAST=UPCAST)
    else:  # k×k: one GEMM over the input channels per tap (an implicit GEMM)
        acc = common.full_conv_taps(acc, x + offs_b * x_sb, x_sc, x_sh, x_sw, in_channels, weight, w_sk, w_sn, w_skh,
                                    w_skw, offs_n, mask_n, offs_h, offs_w, mask_m, KSIZE, stride_h, stride_w, pad_h,
                                    pad_w, height, width, BLOCK_K=BLOCK_K, PRECISION=PRECISION, UPCAST=UPCAST)
    common.epilogue(acc, bias, residual, out, offs_b, offs_h, offs_w, offs_n, mask_m, mask_n, has_bias, has_residual,
                    r_sb, r_sc, r_sh, r_sw, o_sb, o_sc, o_sh, o_sw, ACTIVATION=ACTIVATION, PIXEL_RUN=PIXEL_RUN)


@triton.jit
def _conv_rows_kernel(x, weight, bias, residual, out, in_channels, out_channels, height, width, out_height, out_width,
                      has_bias, has_residual, x_sb, x_sc, x_sh, x_sw, w_sn, w_sk, w_skh, w_skw,
                      r_sb, r_sc, r_sh, r_sw, o_sb, o_sc, o_sh, o_sw, ACTIVATION: tl.constexpr, STRIDE: tl.constexpr,
                      BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, PAIRS: tl.constexpr, PRECISION: tl.constexpr,
                      UPCAST: tl.constexpr):
    # A program: BLOCK_P outputs of one output row × BLOCK_N output channels of a 3×3, padding-1 conv with stride
    # STRIDE (1 or 2). Its input is rows STRIDE·oy-1 .. STRIDE·oy+1 of every input channel, taken PAIRS (channel,
    # kernel row) pairs at a time: each pair is one row of a (PAIRS, STRIDE·BLOCK_P) tile loaded whole, its columns
    # contiguous (wide loads in NCHW, where a shifted or strided tap reads 2 bytes at a time), plus the column left
    # of it (and, at stride 1, the one right of it). Kernel column kw of output j is tile column STRIDE·j + kw - 1,
    # gathered on chip; each kernel column is then one product over the pairs.
    col_blocks = tl.cdiv(out_width, BLOCK_P)
    image_row = tl.program_id(0) // col_blocks
    out_x0 = (tl.program_id(0) % col_blocks) * BLOCK_P
    img = image_row // out_height
    out_y = image_row % out_height
    j = tl.arange(0, BLOCK_P)
    cols = STRIDE * out_x0 + tl.arange(0, STRIDE * BLOCK_P)
    right = out_x0 + BLOCK_P  # stride 1: the column right of the tile, kernel column 2 of output BLOCK_P - 1
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < out_channels
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for pair0 in range(0, 3 * in_channels, PAIRS):
        pair = pair0 + tl.arange(0, PAIRS)
        kh = pair % 3
        in_y = STRIDE * out_y - 1 + kh
        pair_used = pair < 3 * in_channels
        pair_ok = pair_used & (in_y >= 0) & (in_y < height)
        rows = x + img * x_sb + (pair // 3) * x_sc + in_y * x_sh
        tile = tl.load(rows[:, None] + cols[None, :] * x_sw, mask=pair_ok[:, None] & (cols < width)[None, :],
                       other=0.0)
        left = tl.load(rows + (STRIDE * out_x0 - 1) * x_sw, mask=pair_ok & (out_x0 > 0), other=0.0)
        if STRIDE == 1:
            beyond = tl.load(rows + right * x_sw, mask=pair_ok & (right < width), other=0.0)
        w_pairs = weight + (pair // 3) * w_sk + kh * w_skh
        for kw in tl.static_range(3):
            source = tl.minimum(tl.maximum(STRIDE * j + kw - 1, 0), STRIDE * BLOCK_P - 1)
            taps = tl.gather(tile, tl.broadcast_to(source[None, :], (PAIRS, BLOCK_P)), 1)
            if kw == 0:  # output 0's left tap: the column left of the tile
                taps = tl.where(j[None, :] == 0, left[:, None], taps)
            if STRIDE == 1 and kw == 2:
                taps = tl.where(j[None, :] == BLOCK_P - 1, beyond[:, None], taps)
            w = tl.load(w_pairs[:, None] + kw * w_skw + offs_n[None, :] * w_sn,
                        mask=pair_used[:, None] & mask_n[None, :], other=0.0)
            acc = common.mma(tl.trans(taps), w, acc, PRECISION=PRECISION, UPCAST=UPCAST)
    out_x = out_x0 + j
    common.epilogue(acc, bias, residual, out, img, out_y, out_x, offs_n, out_x < out_width, mask_n, has_bias,
                    has_residual, r_sb, r_sc, r_sh, r_sw, o_sb, o_sc, o_sh, o_sw, ACTIVATION=ACTIVATION)


def depthwise(a: ConvBnActArgs, out: torch.Tensor, gate: str | None = None) -> torch.Tensor:
    """Writes ``act(depthwise_conv(x) + bias) + residual`` into ``out`` (B, C, H_out, W_out), any strides.
    ``weight`` is (C, 1, k, k). With ``gate`` (an activation name; no residual), the GLU mode: ``weight`` is
    (2·C, 1, k, k) and ``out`` gets ``y[:, :C] · gate(y[:, C:])`` of the conv's activated output y."""
    height, width = a.x.shape[2:]
    batch, channels, out_height, out_width = out.shape
    n_pixels = batch * out_height * out_width
    bias, has_bias, _ = common.optional(a.bias, a.weight)
    residual, has_residual, r_strides = common.optional(a.residual, out)
    planes = None if gate is not None else dw_planes(a, out)
    if planes:
        kernel = a.weight.shape[2]
        _conv_dw_planes_kernel[(batch, common.cdiv(channels, planes))](
            a.x, a.weight, bias, residual, out, channels, height * width, height, width, kernel, kernel // 2,
            channels * height * width, has_bias, has_residual, a.weight.stride(0), a.weight.stride(2),
            a.weight.stride(3), ACTIVATION=a.activation, BLOCK_C=planes, BLOCK_P=DW_PLANE_PIXELS)
        return out
    blocks = dw_blocks(n_pixels, channels)
    grid = (common.cdiv(n_pixels, blocks["BLOCK_P"]), common.cdiv(channels, blocks["BLOCK_C"]))
    _conv_dw_kernel[grid](
        a.x, a.weight, bias, residual, out, n_pixels, channels, height, width, out_height, out_width,
        a.weight.shape[2], *a.stride, *a.padding, has_bias, has_residual, 0 if gate is None else channels,
        *a.x.stride(), a.weight.stride(0), a.weight.stride(2), a.weight.stride(3), *r_strides, *out.stride(),
        ACTIVATION=a.activation, GATE=gate, **blocks, PIXEL_RUN=common.pixel_run(blocks["BLOCK_P"], out, residual))
    return out


def dense(a: ConvBnActArgs, out: torch.Tensor) -> torch.Tensor:
    """Writes ``act(conv2d(x, weight) + bias) + residual`` into ``out`` (B, C_out, H_out, W_out), any strides, for
    a conv with groups 1 and a square k×k kernel of :data:`DENSE_KERNEL_SIZES` (``weight`` (C_out, C_in, k, k))."""
    batch, in_channels, height, width = a.x.shape
    _, out_channels, out_height, out_width = out.shape
    n_pixels = batch * out_height * out_width
    bias, has_bias, _ = common.optional(a.bias, a.weight)
    residual, has_residual, r_strides = common.optional(a.residual, out)
    ksize = a.weight.shape[2]
    moved = sum(t.numel() * t.element_size() for t in (a.x, a.weight, out))
    blocks = dense_blocks(n_pixels, out_channels, in_channels, ksize, 2 * n_pixels * a.weight.numel() / moved)
    tiles = common.cdiv(n_pixels, blocks["BLOCK_M"]) * common.cdiv(out_channels, blocks["BLOCK_N"])
    splits = dense_splits(tiles, in_channels, blocks) if ksize == 1 else 1
    options = {"num_warps": dense_warps(a.compute_dtype(), ksize, blocks), **common.dot_mode(a.compute_dtype(), "conv")}
    if splits == 1:
        run = common.pixel_run(blocks["BLOCK_M"], out, residual)
        _conv_dense_kernel[(tiles, 1)](
            a.x, a.weight, bias, residual, out, n_pixels, in_channels, out_channels, height, width, out_height,
            out_width, *a.stride, *a.padding, has_bias, has_residual, in_channels, *a.x.stride(), *a.weight.stride(),
            *r_strides, 0, *out.stride(), ACTIVATION=a.activation, KSIZE=ksize, **blocks, **options, SPLIT_K=False,
            PIXEL_RUN=run)
        return out
    sums = split_sum.partials(out, splits)
    _conv_dense_kernel[(tiles, splits)](
        a.x, a.weight, bias, residual, sums, n_pixels, in_channels, out_channels, height, width, out_height,
        out_width, *a.stride, *a.padding, 0, 0, split_sum.slice_length(in_channels, blocks["BLOCK_K"], splits),
        *a.x.stride(), *a.weight.stride(), 0, 0, 0, 0, batch * sums.stride(0), *sums.stride(), ACTIVATION="none",
        KSIZE=ksize, **blocks, **options, SPLIT_K=True, PIXEL_RUN=common.pixel_run(blocks["BLOCK_M"], sums))
    return split_sum.add(sums, a.bias, a.residual, out, a.activation)


def rows(a: ConvBnActArgs, out: torch.Tensor) -> torch.Tensor:
    """Writes ``act(conv2d(x, weight) + bias) + residual`` into ``out``, any strides, for a 3×3 conv with padding 1,
    stride 1 or 2 and groups 1, its input rows staged whole (see ``_conv_rows_kernel``)."""
    batch, in_channels, height, width = a.x.shape
    _, out_channels, out_height, out_width = out.shape
    bias, has_bias, _ = common.optional(a.bias, a.weight)
    residual, has_residual, r_strides = common.optional(a.residual, out)
    grid = (batch * out_height * common.cdiv(out_width, ROWS_BLOCK_P), common.cdiv(out_channels, ROWS_BLOCK_N))
    _conv_rows_kernel[grid](
        a.x, a.weight, bias, residual, out, in_channels, out_channels, height, width, out_height, out_width,
        has_bias, has_residual, *a.x.stride(), *a.weight.stride(), *r_strides, *out.stride(),
        ACTIVATION=a.activation, STRIDE=a.stride[0], BLOCK_P=ROWS_BLOCK_P, BLOCK_N=ROWS_BLOCK_N, PAIRS=ROWS_PAIRS,
        num_warps=dense_warps(a.x.dtype, 3), **common.dot_mode(a.x.dtype, "conv"))
    return out


def compile_configs():
    """Every (kernel, signature, constexprs[, options]) the launchers above can request: CI compiles each one ahead of
    time for sm_90, so an error only the GPU compiler would raise fails there instead of on a user's GPU. The runs
    of adjacent pixels (``PIXEL_RUN``) change only the epilogue's addressing: they are built with one activation
    (the released models' own builds come from their launches)."""
    from evit_kernels.ops.conv_bn_act import ACTIVATIONS

    pointers = ("x", "weight", "bias", "residual", "out")
    for dtype, ptr in common.POINTER_TYPES.items():
        for activation in ACTIVATIONS:
            runs = (1, *common.RUNS) if activation == ACTIVATIONS[0] else (1,)
            # ungated, and in the GLU mode gated by the same activation (the gate is elementwise code only; the
            # released models' own pairs are built from their launches)
            for blocks, gate, run in itertools.product((DW_BLOCKS, DW_SMALL_GRID_BLOCKS), (None, activation), runs):
                constexprs = {"ACTIVATION": activation, "GATE": gate, "BLOCK_P": blocks["BLOCK_P"],
                              "BLOCK_C": blocks["BLOCK_C"], "PIXEL_RUN": run}
                yield (_conv_dw_kernel, common.signature(_conv_dw_kernel, ptr, constexprs, pointers), constexprs,
                       {"num_warps": blocks["num_warps"]})
            for planes in DW_PLANE_CHANNELS:
                constexprs = {"ACTIVATION": activation, "BLOCK_C": planes, "BLOCK_P": DW_PLANE_PIXELS}
                yield (_conv_dw_planes_kernel, common.signature(_conv_dw_planes_kernel, ptr, constexprs, pointers),
                       constexprs)
            for mode, stride in itertools.product(common.compiled_dot_modes(dtype), (1, 2)):
                constexprs = {"ACTIVATION": activation, "STRIDE": stride, "BLOCK_P": ROWS_BLOCK_P,
                              "BLOCK_N": ROWS_BLOCK_N, "PAIRS": ROWS_PAIRS, **mode}
                yield (_conv_rows_kernel, common.signature(_conv_rows_kernel, ptr, constexprs, pointers), constexprs,
                       {"num_warps": dense_warps(dtype, 3)})
            for mode, ksize, blocks, run in itertools.product(common.compiled_dot_modes(dtype), DENSE_KERNEL_SIZES,
                                                              (DENSE_BLOCKS, DENSE_SMALL_GRID_BLOCKS), runs):
                constexprs = {"ACTIVATION": activation, "KSIZE": ksize, **blocks, **mode, "SPLIT_K": False,
                              "PIXEL_RUN": run}
                yield (_conv_dense_kernel, common.signature(_conv_dense_kernel, ptr, constexprs, pointers),
                       constexprs, {"num_warps": dense_warps(dtype, ksize, blocks)})
        split_blocks = (DENSE_BLOCKS, DENSE_SMALL_GRID_BLOCKS)  # a long reduction splits on regular tiles too
        for mode, blocks, run in itertools.product(common.compiled_dot_modes(dtype), split_blocks,
                                                   (1, *common.RUNS)):
            constexprs = {"ACTIVATION": "none", "KSIZE": 1, **blocks, **mode, "SPLIT_K": True, "PIXEL_RUN": run}
            yield (_conv_dense_kernel, common.signature(_conv_dense_kernel, ptr, constexprs, pointers,
                                                        special={"out": "*fp32"}),
                   constexprs, {"num_warps": dense_warps(dtype, 1, blocks)})  # a split 1×1 conv's slices
