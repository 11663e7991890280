"""Triton kernel of ``evit::conv_block`` (inference) for the depthwise conv and the projection of DSConv and
MBConv in one pass, BatchNorm folded,

    d   = act2(depthwise_kxk(x, w2, stride, padding) + b2)
    out = act3(conv1x1(d, w3) + b3) + residual

(for MBConv, ``x`` is the expanded tensor ``h``, which conv_bn_act's 1×1 kernel writes first). A program owns a tile
of output pixels and every output channel, and walks the depthwise channels in chunks of BLOCK_H: each chunk of
``d`` is produced on chip in fp32 and consumed at once by ``acc += d · w3_chunkᵀ``, so ``d`` never reaches memory and
no tap is recomputed for another output-channel block. The other blocks (FusedMBConv, GLUMBConv, a block with more
output channels than one program holds or too few pixel tiles to fill the GPU, a block without a projection) run
layer by layer on conv_bn_act's kernels (``evit_kernels.ops.conv_block``): on an H200 the whole-block kernels this
file held for them (the expand on chip too, its tile gathered per tap) measured 1.6–6.8× slower than eager, and the
DSConv kernel and the layer-by-layer kernels faster than eager (docs/performance.md, "Measured on a GPU").

Tensors are read and written through their four strides (NCHW, channels_last or any layout); offsets are 32-bit,
which the op's backend checks (``dispatch.Backend.int32_offsets``).
"""

from __future__ import annotations

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
def _dsconv_fwd_kernel(
        x, w2, b2, w3, b3, residual, out,
        batch, hidden, out_channels, height, width, out_height, out_width,
        stride_h, stride_w, pad_h, pad_w, has_b2, has_b3, has_residual,
        x_sb, x_sc, x_sh, x_sw, w2_sh, w2_skh, w2_skw, w3_so, w3_sh,
        r_sb, r_sc, r_sh, r_sw, o_sb, o_sc, o_sh, o_sw,
        ACT2: tl.constexpr, ACT3: tl.constexpr, K: tl.constexpr, P: tl.constexpr, BLOCK_H: tl.constexpr,
        BLOCK_CO: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # `hidden`: the depthwise conv's channels (x's), the projection's input.
    offs_co = tl.arange(0, BLOCK_CO)
    mask_co = offs_co < out_channels
    offs_p = tl.program_id(0) * P + tl.arange(0, P)
    out_ok = offs_p < batch * out_height * out_width
    out_img, out_y, out_x = common.pixel_coords(offs_p, out_height, out_width)
    acc = tl.zeros((P, BLOCK_CO), dtype=tl.float32)
    for h0 in range(0, hidden, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < hidden
        d = common.depthwise_taps(x + out_img * x_sb, x_sc, x_sh, x_sw, w2, w2_sh, w2_skh, w2_skw, offs_h, mask_h,
                                  out_y, out_x, out_ok, K, stride_h, stride_w, pad_h, pad_w, height, width,
                                  BLOCK_P=P, BLOCK_C=BLOCK_H)
        d = common.activate(common.add_bias(d, b2, offs_h, mask_h, has_b2), ACTIVATION=ACT2)
        # Padded hidden columns hold finite values (act2(0)) and meet w3 rows masked to 0.
        w3_tile = tl.load(w3 + offs_h[:, None] * w3_sh + offs_co[None, :] * w3_so,
                          mask=mask_h[:, None] & mask_co[None, :], other=0.0)
        acc = common.mma(d, w3_tile, acc, PRECISION=PRECISION, UPCAST=UPCAST)
    common.epilogue(acc, b3, residual, out, out_img, out_y, out_x, offs_co, out_ok, mask_co, has_b3, has_residual,
                    r_sb, r_sc, r_sh, r_sw, o_sb, o_sc, o_sh, o_sw, ACTIVATION=ACT3)


# --- tiles ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tiles:
    """The tile of one precision and width: ``pixels`` output pixels × up to ``channels`` output channels per
    program. Every size compiles for sm_90 without register spills under triton 3.6 and 3.8 (compile_configs): the
    fp32 accumulator of all output channels is what fills the registers, so wider projections take fewer pixels.
    fp32 runs IEEE dots on FMA units, which hold their operands in registers, hence its smaller tile, and gives
    ptxas the hardware's 255 registers (``maxnreg``): without a limit it may spill a few to fit more CTAs on an
    SM."""

    warps: int
    pixels: int
    channels: int
    maxnreg: int | None = None


_LOW_PRECISION = (Tiles(warps=8, pixels=64, channels=128), Tiles(warps=8, pixels=32, channels=256))
TILES = {torch.float32: (Tiles(warps=4, pixels=32, channels=128, maxnreg=255),), torch.float16: _LOW_PRECISION,
         torch.bfloat16: _LOW_PRECISION}
"""Per dtype, the tiles from narrowest to widest projection. The 256-wide tile builds spill-free only with 32 pixels,
on mma.sync (half wgmma's peak); a 512-wide one too, but then the projection's products make the kernel slower than
the layer-by-layer kernels by the formula (L2's `stages.3` MBConvs: 0.141 against 0.119 ms predicted), so wider blocks
run layer by layer."""
BLOCK_H = 16


def tile_config(dtype: torch.dtype, out_channels: int) -> dict | None:
    """Every launch parameter that depends on the shape, or None when one program cannot hold every output
    channel (the block then runs layer by layer: a second output-channel block would redo the depthwise conv)."""
    block_co = common.dot_size(out_channels)
    tiles = next((t for t in TILES[dtype] if block_co <= t.channels), None)
    if tiles is None:
        return None
    return {"P": tiles.pixels, "BLOCK_H": BLOCK_H, "BLOCK_CO": block_co, "num_warps": tiles.warps,
            "maxnreg": tiles.maxnreg}


def forward(a: ConvBlockArgs, out: torch.Tensor, config: dict) -> torch.Tensor:
    """Writes the block's output into ``out`` (B, C_out, H_out, W_out), any strides, from ``a.x``, the depthwise
    conv's input (``a.w1`` is not applied: an MBConv's caller passes the expanded tensor); ``config`` is
    :func:`tile_config`'s for these shapes."""
    batch, hidden, height, width = a.x.shape
    _, out_channels, out_height, out_width = out.shape
    b2, has_b2, _ = common.optional(a.b2, a.w2)
    b3, has_b3, _ = common.optional(a.b3, a.w3)
    residual, has_residual, r_strides = common.optional(a.residual, out)
    config = dict(config)
    options = {"num_warps": config.pop("num_warps"), "maxnreg": config.pop("maxnreg")}
    # num_stages=1: the loops are short and their loads feed on-chip math, not a long GEMM to pipeline.
    _dsconv_fwd_kernel[(triton.cdiv(batch * out_height * out_width, config["P"]),)](
        a.x, a.w2, b2, a.w3, b3, residual, out,
        batch, hidden, out_channels, height, width, out_height, out_width,
        *a.stride, *a.padding, has_b2, has_b3, has_residual,
        *a.x.stride(), a.w2.stride(0), a.w2.stride(2), a.w2.stride(3), a.w3.stride(0), a.w3.stride(1), *r_strides,
        *out.stride(),
        ACT2=a.act2, ACT3=a.act3, K=a.w2.shape[2], num_stages=1, **options, **config,
        **common.dot_mode(a.compute_dtype()))
    return out


def compile_configs():
    """Every (kernel, signature, constexprs, options) the launcher can request, for CI's ahead-of-time sm_90
    compile: dtype × output-channel block × kernel size, with one representative pair of activations (they change
    only elementwise code; conv_bn_act compiles every activation)."""
    pointers = ("x", "w2", "b2", "w3", "b3", "residual", "out")
    for dtype, widths in TILES.items():
        for narrower, tiles in zip((None, *widths), widths):
            above = 0 if narrower is None else narrower.channels  # the narrower tile's blocks are its own
            for block_co in (16 << i for i in range(tiles.channels.bit_length()) if above < 16 << i <= tiles.channels):
                for ksize in KERNEL_SIZES:
                    constexprs = {"ACT2": "hardswish", "ACT3": "none", "K": ksize, "P": tiles.pixels,
                                  "BLOCK_H": BLOCK_H, "BLOCK_CO": block_co, **common.dot_mode(dtype)}
                    types = common.signature(_dsconv_fwd_kernel, common.POINTER_TYPES[dtype], constexprs, pointers)
                    yield _dsconv_fwd_kernel, types, constexprs, {"num_warps": tiles.warps, "num_stages": 1,
                                                                  "maxnreg": tiles.maxnreg}
