"""Triton kernel of ``evit::conv_block`` (inference) for the spatial conv and the projection of DSConv, MBConv and
FusedMBConv in one pass, BatchNorm folded,

    d   = act2(conv_kxk(x, w2, stride, padding) + b2)      depthwise (DSConv, MBConv) or full (FusedMBConv)
    out = act3(conv1x1(d, w3) + b3) + residual

(for MBConv, ``x`` is the expanded tensor ``h``, which conv_bn_act's 1×1 kernel writes first). A program owns a tile
of output pixels and every output channel, and walks the channels of ``d`` in chunks of BLOCK_H: each chunk is
produced on chip in fp32 (depthwise: the taps as FMAs; full: one product over the input channels per tap, as
conv_bn_act's implicit GEMM computes it) and consumed at once by ``acc += d · w3_chunkᵀ``, so ``d`` never reaches
memory and no tap is recomputed for another output-channel block. The other blocks (GLUMBConv, a block with more
output channels than one program holds or too few pixel tiles to fill the GPU, a block without a projection, a full
conv of fewer than 16 input channels) run layer by layer on conv_bn_act's kernels (``evit_kernels.ops.conv_block``).
On an H200 the whole-block kernels this file held before (the expand on chip too, its tile gathered per tap; the full
conv in 16-channel chunks of ``d``, its input re-read for each) measured 1.6–6.8× slower than eager, where the DSConv
kernel and the layer-by-layer kernels beat eager (docs/performance.md, "Measured on a GPU"); the full conv's chunks are
now 64 channels in fp16/bf16, the N of a wgmma product.

Tensors are read and written through their four strides (NCHW, channels_last or any layout); offsets are 32-bit,
which the op's backend checks (``dispatch.Backend.int32_offsets``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from evit_kernels.triton import _common as common

if TYPE_CHECKING:
    from evit_kernels.ops.conv_block import ConvBlockArgs

KERNEL_SIZES = (3, 5, 7)


@triton.jit
def _conv_project_fwd_kernel(
        x, w2, b2, w3, b3, residual, out,
        batch, in_channels, hidden, out_channels, height, width, out_height, out_width,
        stride_h, stride_w, pad_h, pad_w, has_b2, has_b3, has_residual,
        x_sb, x_sc, x_sh, x_sw, w2_sn, w2_sk, w2_skh, w2_skw, w3_so, w3_sh,
        r_sb, r_sc, r_sh, r_sw, o_sb, o_sc, o_sh, o_sw,
        ACT2: tl.constexpr, ACT3: tl.constexpr, K: tl.constexpr, DEPTHWISE: tl.constexpr, P: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_CO: tl.constexpr, PIXELS_ON_N: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr, PIXEL_RUN: tl.constexpr):
    # `hidden`: the spatial conv's output channels, the projection's input. DEPTHWISE: its input is `hidden` wide
    # (w2 (hidden, 1, K, K)); else a full conv of `in_channels` (w2 (hidden, in_channels, K, K)). PIXELS_ON_N: the
    # tiles are transposed (channels × pixels: dᵀ, then outᵀ = w3 · dᵀ), so that a tile of fewer than 64 pixels still
    # gives each product the 64 rows wgmma takes. PIXEL_RUN: common.pixel_run of the output and the residual.
    offs_co = tl.arange(0, BLOCK_CO)
    mask_co = offs_co < out_channels
    offs_p = tl.program_id(0) * P + tl.arange(0, P)
    out_ok = offs_p < batch * out_height * out_width
    out_img, out_y, out_x = common.pixel_coords(offs_p, out_height, out_width)
    x_img = x + out_img * x_sb
    if PIXELS_ON_N:
        acc = tl.zeros((BLOCK_CO, P), dtype=tl.float32)
    else:
        acc = tl.zeros((P, BLOCK_CO), dtype=tl.float32)
    for h0 in range(0, hidden, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < hidden
        if DEPTHWISE:
            d = common.depthwise_taps(x_img, x_sc, x_sh, x_sw, w2, w2_sn, w2_skh, w2_skw, offs_h, mask_h, out_y, out_x,
                                      out_ok, K, stride_h, stride_w, pad_h, pad_w, height, width, BLOCK_P=P,
                                      BLOCK_C=BLOCK_H)
            if PIXELS_ON_N:
                d = tl.trans(d)
        else:
            if PIXELS_ON_N:
                d = tl.zeros((BLOCK_H, P), dtype=tl.float32)
            else:
                d = tl.zeros((P, BLOCK_H), dtype=tl.float32)
            d = common.full_conv_taps(d, x_img, x_sc, x_sh, x_sw, in_channels, w2, w2_sk, w2_sn, w2_skh, w2_skw, offs_h,
                                      mask_h, out_y, out_x, out_ok, K, stride_h, stride_w, pad_h, pad_w, height, width,
                                      BLOCK_K=BLOCK_K, PRECISION=PRECISION, UPCAST=UPCAST, TRANSPOSED=PIXELS_ON_N)
        d = common.activate(common.add_bias(d, b2, offs_h, mask_h, has_b2, PIXELS_ON_N), ACTIVATION=ACT2)
        # Padded hidden channels hold finite values (act2(0)) and meet w3 entries masked to 0.
        h_at, co_at = common.outer(offs_h * w3_sh, offs_co * w3_so, PIXELS_ON_N)
        h_ok, co_ok = common.outer(mask_h, mask_co, PIXELS_ON_N)
        w3_tile = tl.load(w3 + h_at + co_at, mask=h_ok & co_ok, other=0.0)
        if PIXELS_ON_N:
            acc = common.mma(w3_tile, d, acc, PRECISION=PRECISION, UPCAST=UPCAST)
        else:
            acc = common.mma(d, w3_tile, acc, PRECISION=PRECISION, UPCAST=UPCAST)
    common.epilogue(acc, b3, residual, out, out_img, out_y, out_x, offs_co, out_ok, mask_co, has_b3, has_residual,
                    r_sb, r_sc, r_sh, r_sw, o_sb, o_sc, o_sh, o_sw, ACTIVATION=ACT3, TRANSPOSED=PIXELS_ON_N,
                    PIXEL_RUN=PIXEL_RUN)


# --- tiles ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tiles:
    """The tile of one precision, spatial conv and width: ``pixels`` output pixels × up to ``channels`` output
    channels per program, walking the spatial conv's channels ``hidden`` at a time. Every size compiles for sm_90
    without register spills under triton 3.6 and 3.8 (compile_configs): the fp32 accumulator of all output channels
    is what fills the registers, so wider projections take fewer pixels. fp32 runs IEEE dots on FMA units, which hold
    their operands in registers, hence its smaller tile, and gives ptxas the hardware's 255 registers (``maxnreg``):
    without a limit it may spill a few to fit more CTAs on an SM."""

    warps: int
    pixels: int
    channels: int
    hidden: int
    pixels_on_n: bool = False
    maxnreg: int | None = None


TILES = {
    "depthwise": {torch.float32: (Tiles(warps=4, pixels=32, channels=128, hidden=16, maxnreg=255),),
                  **dict.fromkeys((torch.float16, torch.bfloat16), (
                      Tiles(warps=8, pixels=64, channels=128, hidden=16),
                      Tiles(warps=8, pixels=32, channels=512, hidden=16, pixels_on_n=True)))},
    "full": {torch.float32: (Tiles(warps=4, pixels=32, channels=128, hidden=32, maxnreg=255),),
             **dict.fromkeys((torch.float16, torch.bfloat16), (
                 Tiles(warps=8, pixels=64, channels=128, hidden=64),
                 Tiles(warps=8, pixels=32, channels=256, hidden=64, pixels_on_n=True)))},
}
"""Per kind of spatial conv (depthwise or full) and dtype, the tiles from narrowest to widest projection. The
depthwise taps are FMAs on a (pixels × 16) chunk; the full conv's are products over the input channels, 64 hidden
channels wide (wgmma's N, or its M transposed). Projections wider than 128 build spill-free only on tiles of 32
pixels, fewer than the 64 rows a wgmma product takes, so those tiles run transposed (``pixels_on_n``: channels are
the products' rows, pixels their columns) and stay on wgmma: up to 512 outputs behind a depthwise conv, 256 behind a
full one (a 512-wide full-conv tile spills)."""
BLOCK_K = 32
"""Input channels per product of the full conv's taps (conv_bn_act's implicit GEMM takes as many)."""


def tile_config(dtype: torch.dtype, depthwise: bool, out_channels: int) -> dict | None:
    """Every launch parameter that depends on the shape, or None when one program cannot hold every output
    channel (the block then runs layer by layer: a second output-channel block would redo the spatial conv)."""
    block_co = common.dot_size(out_channels)
    tiles = next((t for t in TILES["depthwise" if depthwise else "full"][dtype] if block_co <= t.channels), None)
    if tiles is None:
        return None
    return {"DEPTHWISE": depthwise, "P": tiles.pixels, "BLOCK_H": tiles.hidden, "BLOCK_K": BLOCK_K,
            "BLOCK_CO": block_co, "PIXELS_ON_N": tiles.pixels_on_n, "num_warps": tiles.warps, "maxnreg": tiles.maxnreg}


def forward(a: ConvBlockArgs, out: torch.Tensor, config: dict) -> torch.Tensor:
    """Writes the block's output into ``out`` (B, C_out, H_out, W_out), any strides, from ``a.x``, the spatial
    conv's input (``a.w1`` is not applied: an MBConv's caller passes the expanded tensor); ``config`` is
    :func:`tile_config`'s for these shapes."""
    batch, in_channels, height, width = a.x.shape
    _, out_channels, out_height, out_width = out.shape
    b2, has_b2, _ = common.optional(a.b2, a.w2)
    b3, has_b3, _ = common.optional(a.b3, a.w3)
    residual, has_residual, r_strides = common.optional(a.residual, out)
    config = dict(config)
    options = {"num_warps": config.pop("num_warps"), "maxnreg": config.pop("maxnreg")}
    # num_stages=1: the loops are short and their loads feed on-chip math, not a long GEMM to pipeline.
    _conv_project_fwd_kernel[(common.cdiv(batch * out_height * out_width, config["P"]),)](
        a.x, a.w2, b2, a.w3, b3, residual, out,
        batch, in_channels, a.w2.shape[0], out_channels, height, width, out_height, out_width,
        *a.stride, *a.padding, has_b2, has_b3, has_residual,
        *a.x.stride(), *a.w2.stride(), a.w3.stride(0), a.w3.stride(1), *r_strides, *out.stride(),
        ACT2=a.act2, ACT3=a.act3, K=a.w2.shape[2], num_stages=1, **options, **config,
        **common.dot_mode(a.compute_dtype(), "conv"), PIXEL_RUN=common.pixel_run(config["P"], out, residual))
    return out


def compile_configs():
    """Every (kernel, signature, constexprs, options) the launcher can request, for CI's ahead-of-time sm_90
    compile: spatial conv × dtype × output-channel block × kernel size, with one representative pair of activations
    (they change only elementwise code; conv_bn_act compiles every activation)."""
    pointers = ("x", "w2", "b2", "w3", "b3", "residual", "out")
    for kind, per_dtype in TILES.items():
        for dtype, widths in per_dtype.items():
            for narrower, tiles in zip((None, *widths), widths):
                above = 0 if narrower is None else narrower.channels  # the narrower tile's blocks are its own
                for block_co in (16 << i for i in range(tiles.channels.bit_length())
                                 if above < 16 << i <= tiles.channels):
                    for ksize, mode, run in itertools.product(KERNEL_SIZES, common.compiled_dot_modes(dtype),
                                                              (1, *common.RUNS)):
                        if run > 1 and ksize != KERNEL_SIZES[0]:
                            continue  # the runs change only the epilogue's addressing
                        constexprs = {"ACT2": "hardswish", "ACT3": "none", "K": ksize, "DEPTHWISE": kind == "depthwise",
                                      "P": tiles.pixels, "BLOCK_H": tiles.hidden, "BLOCK_K": BLOCK_K,
                                      "BLOCK_CO": block_co, "PIXELS_ON_N": tiles.pixels_on_n, **mode,
                                      "PIXEL_RUN": run}
                        types = common.signature(_conv_project_fwd_kernel, common.POINTER_TYPES[dtype], constexprs,
                                                 pointers)
                        yield _conv_project_fwd_kernel, types, constexprs, {"num_warps": tiles.warps, "num_stages": 1,
                                                                            "maxnreg": tiles.maxnreg}
