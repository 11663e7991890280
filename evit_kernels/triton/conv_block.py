"""Triton kernel of ``evit::conv_block`` (inference): a whole EfficientViT conv block, BatchNorm folded,

    h   = act1(conv1x1(x, w1) + b1)                       (MBConv's expand; absent in DSConv / FusedMBConv)
    d   = act2(conv_kxk(h, w2, stride, padding) + b2)      (depthwise in MBConv / DSConv, full in FusedMBConv)
    d   = d[:, :m] · gate(d[:, m:])                   (GLU mode, ``GATED``: GLUMBConv; m = half of d's channels)
    out = act3(conv1x1(d, w3) + b3) + residual

in one pass where one program holds every output channel. A program owns a tile of output pixels and walks the
hidden channels (the expanded width) in chunks of BLOCK_H: each chunk of ``d`` is produced on chip in fp32 and
consumed at once by ``acc += d · w3_chunkᵀ``, so neither the expanded tensor nor the spatial conv's output (4–6×
the block's input in MBConv, docs/performance.md, "Minimum traffic") ever reaches memory. Where the output
channels need several blocks, each block would recompute every chunk of ``d``: the block then runs in two passes
(:func:`one_pass`), the first (``STORE_HIDDEN``) writing ``d`` once, a program per (pixel tile, hidden chunk), the
second the projection on conv_bn_act's 1×1 kernel. In GLU mode a chunk of the projection's input is made of two
chunks of ``d``, channels c and c + m, computed one after the other; the first pass then writes only the gated
m channels. How a chunk of ``d`` is produced is the constexpr ``SPATIAL``:

- "expand_depthwise" (MBConv): the expand GEMM runs on the program's input *slots*, the input pixels its output
  tile reads (whole images for small maps, else a band of rows plus the depthwise halo), into an fp32 register
  tile; each k×k tap is then a ``tl.gather`` of that tile (on-chip staging: Triton lowers it through shared
  memory), so the expanded tensor is computed once per slot instead of once per tap. Taps that fall in the zero
  padding read nothing, as the depthwise conv pads the *expanded* map with zeros.
- "depthwise" (DSConv): each tap reads ``x`` itself (re-reads hit L1/L2), as conv_bn_act's depthwise kernel.
- "full" (FusedMBConv): the k×k conv is an implicit GEMM over (tap, input channel).

Tensors are read and written through their four strides (NCHW, channels_last or any layout); offsets are 32-bit,
which the op's backend checks (``dispatch.Backend.int32_offsets``). Tile sizes are a first guess that compiles for
sm_90 without spills; they are to be tuned on the GPU.
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
def _band_pixels(slot, img0, images, row0, rows, batch, width):
    """(image, row, column, valid) of the slots numbered ``slot`` in a tile of ``images`` images × ``rows`` rows
    from ``row0``, packed image after image, row after row."""
    per_image = rows * width
    img = img0 + slot // per_image
    rest = slot % per_image
    valid = (slot < images * per_image) & (img < batch)
    return img, row0 + rest // width, rest % width, valid


@triton.jit
def _expand_depthwise_chunk(x, w1, b1, w2, offs_h, mask_h, img0, images, in_row0, in_rows, out_img, out_y, out_x,
                            out_ok, batch, in_channels, height, width, stride_h, stride_w, pad_h, pad_w, has_b1,
                            x_sb, x_sc, x_sh, x_sw, w1_sh, w1_sc, w2_sh, w2_skh, w2_skw,
                            ACT1: tl.constexpr, K: tl.constexpr, SLOTS: tl.constexpr,
                            P: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                            PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Σ_taps w2 · act1(x · w1ᵀ + b1) for one hidden chunk: the expand on the input slots, then a gather per tap."""
    slot = tl.arange(0, SLOTS)
    s_img, s_y, s_x, s_ok = _band_pixels(slot, img0, images, in_row0, in_rows, batch, width)
    x_rows = x + s_img * x_sb + s_y * x_sh + s_x * x_sw
    expanded = common.gemm_rows(tl.zeros((SLOTS, BLOCK_H), dtype=tl.float32), x_rows, s_ok, x_sc, in_channels, w1,
                                w1_sc, w1_sh, offs_h, mask_h, BLOCK_K=BLOCK_K, PRECISION=PRECISION, UPCAST=UPCAST)
    expanded = common.add_bias(expanded, b1, offs_h, mask_h, has_b1)
    expanded = common.activate(expanded, ACTIVATION=ACT1)
    d = tl.zeros((P, BLOCK_H), dtype=tl.float32)
    for kh in range(K):
        for kw in range(K):
            iy, ix, inside = common.tap(out_y, out_x, out_ok, kh, kw, stride_h, stride_w, pad_h, pad_w, height, width)
            source = tl.where(inside, (out_img - img0) * in_rows * width + (iy - in_row0) * width + ix, 0)
            gathered = tl.gather(expanded, tl.broadcast_to(source[:, None], (P, BLOCK_H)), 0)
            wv = tl.load(w2 + offs_h * w2_sh + kh * w2_skh + kw * w2_skw, mask=mask_h, other=0.0).to(tl.float32)
            d += tl.where(inside[:, None], gathered, 0.0) * wv[None, :]
    return d


@triton.jit
def _full_conv_chunk(x, w2, offs_h, mask_h, out_img, out_y, out_x, out_ok, in_channels, height, width,
                     stride_h, stride_w, pad_h, pad_w, x_sb, x_sc, x_sh, x_sw, w2_sh, w2_sc, w2_skh, w2_skw,
                     K: tl.constexpr, P: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                     PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """The k×k conv for one chunk of output (hidden) channels, as an implicit GEMM over (tap, input channel)."""
    x_img = x + out_img * x_sb
    d = tl.zeros((P, BLOCK_H), dtype=tl.float32)
    for kh in range(K):
        for kw in range(K):
            iy, ix, inside = common.tap(out_y, out_x, out_ok, kh, kw, stride_h, stride_w, pad_h, pad_w, height, width)
            d = common.gemm_rows(d, x_img + iy * x_sh + ix * x_sw, inside, x_sc, in_channels,
                                 w2 + kh * w2_skh + kw * w2_skw, w2_sc, w2_sh, offs_h, mask_h, BLOCK_K=BLOCK_K,
                                 PRECISION=PRECISION, UPCAST=UPCAST)
    return d


@triton.jit
def _conv_block_fwd_kernel(
        x, w1, b1, w2, b2, w3, b3, residual, out,
        batch, in_channels, hidden, out_channels, height, width, out_height, out_width,
        stride_h, stride_w, pad_h, pad_w, band_rows, bands, images, has_b1, has_b2, has_b3, has_residual,
        x_sb, x_sc, x_sh, x_sw, w1_sh, w1_sc, w2_sh, w2_sc, w2_skh, w2_skw, w3_so, w3_sh,
        r_sb, r_sc, r_sh, r_sw, o_sb, o_sc, o_sh, o_sw,
        SPATIAL: tl.constexpr, ACT1: tl.constexpr, ACT2: tl.constexpr, ACT3: tl.constexpr, K: tl.constexpr,
        SLOTS: tl.constexpr, P: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_CO: tl.constexpr, STORE_HIDDEN: tl.constexpr, GATED: tl.constexpr, ACT_GATE: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # `hidden`: the projection's input channels (half of d's in GLU mode). STORE_HIDDEN: the first of two passes.
    # Program (tile, j) computes hidden chunk j (of the gated tensor in GLU mode) and stores it in `out`; no chunk
    # is computed twice. Otherwise program (tile, j) computes every chunk and projects it onto output-channel
    # block j.
    offs_co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    mask_co = offs_co < out_channels
    if STORE_HIDDEN:
        h_first = tl.program_id(1) * BLOCK_H
        h_end = h_first + BLOCK_H
    else:
        h_first = 0
        h_end = hidden
    if SPATIAL == "expand_depthwise":
        # A band of `band_rows` output rows of one image, or `images` whole images (band_rows == out_height).
        img0 = (tl.program_id(0) // bands) * images
        row0 = (tl.program_id(0) % bands) * band_rows
        rows = tl.minimum(band_rows, out_height - row0)
        out_img, out_y, out_x, out_ok = _band_pixels(tl.arange(0, P), img0, images, row0, rows, batch,
                                                     out_width)
        in_row0 = tl.maximum(row0 * stride_h - pad_h, 0)
        in_rows = tl.minimum((row0 + rows - 1) * stride_h - pad_h + K - 1, height - 1) - in_row0 + 1
    else:
        offs_p = tl.program_id(0) * P + tl.arange(0, P)
        out_ok = offs_p < batch * out_height * out_width
        out_img, out_y, out_x = common.pixel_coords(offs_p, out_height, out_width)
    acc = tl.zeros((P, BLOCK_CO), dtype=tl.float32)
    for h0 in range(h_first, h_end, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < hidden
        # act2(conv + b2) of channels offs_h of d, then in GLU mode of their gates, channels offs_h + hidden.
        for half in tl.static_range(2 if GATED else 1):
            offs_d = offs_h + half * hidden
            if SPATIAL == "expand_depthwise":
                part = _expand_depthwise_chunk(
                    x, w1, b1, w2, offs_d, mask_h, img0, images, in_row0, in_rows, out_img, out_y, out_x, out_ok,
                    batch, in_channels, height, width, stride_h, stride_w, pad_h, pad_w, has_b1, x_sb, x_sc, x_sh,
                    x_sw, w1_sh, w1_sc, w2_sh, w2_skh, w2_skw, ACT1=ACT1, K=K, SLOTS=SLOTS, P=P, BLOCK_H=BLOCK_H,
                    BLOCK_K=BLOCK_K, PRECISION=PRECISION, UPCAST=UPCAST)
            elif SPATIAL == "depthwise":
                part = common.depthwise_taps(x + out_img * x_sb, x_sc, x_sh, x_sw, w2, w2_sh, w2_skh, w2_skw, offs_d,
                                             mask_h, out_y, out_x, out_ok, K, stride_h, stride_w, pad_h, pad_w,
                                             height, width, BLOCK_P=P, BLOCK_C=BLOCK_H)
            else:
                part = _full_conv_chunk(x, w2, offs_d, mask_h, out_img, out_y, out_x, out_ok, in_channels, height,
                                        width, stride_h, stride_w, pad_h, pad_w, x_sb, x_sc, x_sh, x_sw, w2_sh, w2_sc,
                                        w2_skh, w2_skw, K=K, P=P, BLOCK_H=BLOCK_H, BLOCK_K=BLOCK_K,
                                        PRECISION=PRECISION, UPCAST=UPCAST)
            part = common.activate(common.add_bias(part, b2, offs_d, mask_h, has_b2), ACTIVATION=ACT2)
            if half == 0:
                d = part
            else:
                d = d * common.activate(part, ACTIVATION=ACT_GATE)
        if STORE_HIDDEN:
            common.epilogue(d, b2, residual, out, out_img, out_y, out_x, offs_h, out_ok, mask_h, 0, 0,
                            r_sb, r_sc, r_sh, r_sw, o_sb, o_sc, o_sh, o_sw, ACTIVATION="none")
        else:
            # Padded hidden columns hold finite values (act2(0), gated) and meet w3 rows masked to 0.
            w3_tile = tl.load(w3 + offs_h[:, None] * w3_sh + offs_co[None, :] * w3_so,
                              mask=mask_h[:, None] & mask_co[None, :], other=0.0)
            acc = common.mma(d, w3_tile, acc, PRECISION=PRECISION, UPCAST=UPCAST)
    if not STORE_HIDDEN:
        common.epilogue(acc, b3, residual, out, out_img, out_y, out_x, offs_co, out_ok, mask_co, has_b3,
                        has_residual, r_sb, r_sc, r_sh, r_sw, o_sb, o_sc, o_sh, o_sw, ACTIVATION=ACT3)


# --- tiles ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tiles:
    """The tile shapes of one precision. ``bands``: the expand_depthwise tiles, (P output pixels, SLOTS input
    pixels, widest output-channel block of one pass, 0 for a tile that only runs the first of two passes);
    :func:`band_tile` picks one per shape. ``direct_pixels`` / ``direct_channels``: the same for the depthwise and
    full kinds, which have no input slots. More output channels than a block holds take two passes
    (:func:`one_pass`). Every size here compiles for sm_90 without register spills under triton 3.6 and 3.8
    (compile_configs); wider ones spill: the (pixels × channels) accumulator and the epilogue's 64-bit addresses fill
    the registers. fp32 runs IEEE dots on FMA units, which hold their operands in registers, hence its smaller
    tiles. ``maxnreg``: the register limit given to ptxas. fp32 sets the hardware's 255: without a limit ptxas spills
    a few registers in some fp32 tiles to fit more CTAs on an SM, and which tiles changes with the Triton version
    (under triton 3.6, twelve of these, 8–32 B; the other sizes tried spilled under 3.8). The low precisions need no
    limit, and one would cost them occupancy."""

    warps: int
    bands: tuple[tuple[int, int, int], ...]
    direct_pixels: int
    direct_channels: int = 128
    block_k: int = 32
    maxnreg: int | None = None


_LOW_PRECISION = Tiles(warps=8, bands=((64, 64, 64), (64, 128, 64), (64, 256, 32), (128, 256, 0), (256, 256, 0)),
                       direct_pixels=64)
TILES = {torch.float32: Tiles(warps=4, bands=((32, 128, 64),), direct_pixels=32, block_k=16, maxnreg=255),
         torch.float16: _LOW_PRECISION, torch.bfloat16: _LOW_PRECISION}
BLOCK_H = 16
STORE_BLOCK_H = 32
"""The hidden chunk of the first of two passes, which holds no output accumulator: twice the one-pass chunk, so
each program's input tile is re-read from L2 half as often (wider spills with fp32 or 256 input slots)."""
STORE_BLOCK_CO = 16
"""The first pass holds no output accumulator: its BLOCK_CO is a placeholder (tl.dot's minimum)."""
ACTIVATION_FLOPS = 4
"""What :func:`band_tile` charges an activation per element (hardswish and the tanh GELU take a few operations)."""


def _band_geometry(p: int, slots: int, height: int, width: int, out_height: int, out_width: int, stride: int,
                   ksize: int) -> tuple[int, int] | None:
    """(band_rows, images) of a P × SLOTS tile on this map: whole images packed together when they fit, else the
    most output rows whose input rows (halo included) fit the slots; None when not even one row fits."""
    if out_height * out_width <= p and height * width <= slots:
        return out_height, min(p // (out_height * out_width), slots // (height * width))
    rows = min(p // out_width, out_height)
    while rows >= 1 and min((rows - 1) * stride + ksize, height) * width > slots:
        rows -= 1
    return (rows, 1) if rows >= 1 else None


def band_tile(tiles: Tiles, x_shape, out_shape, stride: int, ksize: int, hidden: int, projection: bool = True
              ) -> tuple[int, int, int, int, int] | None:
    """(P, SLOTS, widest channel block, band_rows, images) of the expand_depthwise tile for this block, or None when
    even one output row and its k input rows fit no tile.

    Among the tiles that fit (those holding every output channel in one pass, if any do and the block has a
    ``projection``; without one, every tile runs the first pass only), the one whose programs
    the performance model (docs/performance.md) prices lowest: per program, the expand on SLOTS input pixels
    (products at the tensor-core rate, its activation on FMA), the taps on P output pixels (FMA) and, in one pass,
    the projection; times the waves of programs on the GPU's SMs. Slots and outputs a band leaves empty cost as
    much as used ones, as the GPU runs whole tiles: this is what weighs a tall band's smaller halo against its
    padding and against fewer programs on a small grid."""
    from evit_kernels.predict import PEAK_FLOPS

    batch, in_channels, height, width = x_shape
    _, out_channels, out_height, out_width = out_shape
    fitting = [(tile, geometry) for tile in tiles.bands
               if (geometry := _band_geometry(*tile[:2], height, width, out_height, out_width, stride, ksize))]
    if not fitting:
        return None
    block_co = common.dot_size(out_channels)
    single = [(tile, geometry) for tile, geometry in fitting if projection and tile[2] >= block_co]

    def seconds(candidate) -> float:
        (p, slots, _), (rows, images) = candidate
        per_hidden = (slots * 2 * in_channels + (p * 2 * block_co if single else 0)) / PEAK_FLOPS["wgmma"]
        per_hidden += (slots * ACTIVATION_FLOPS + p * 3 * ksize * ksize) / PEAK_FLOPS["fma"]
        programs = triton.cdiv(batch, images) * triton.cdiv(out_height, rows)
        chunk = hidden if single else STORE_BLOCK_H
        programs *= 1 if single else triton.cdiv(hidden, STORE_BLOCK_H)
        return per_hidden * chunk * triton.cdiv(programs, common.SMS)

    (p, slots, channels), (rows, images) = min(single or fitting, key=seconds)
    return p, slots, channels, rows, images


def tile_config(spatial: str, dtype: torch.dtype, x_shape, out_shape, stride: int, ksize: int, hidden: int,
                projection: bool = True) -> dict | None:
    """Every launch parameter that depends on the shape, or None when the whole-block kernel does not take it
    (``projection`` False: a block that ends with the hidden tensor, i.e. runs only the first pass)."""
    tiles = TILES[dtype]
    out_channels = out_shape[1]
    if spatial == "expand_depthwise":
        tile = band_tile(tiles, x_shape, out_shape, stride, ksize, hidden, projection)
        if tile is None:
            return None
        p, slots, channels, band_rows, images = tile
    else:
        p, slots, channels, band_rows, images = tiles.direct_pixels, 16, tiles.direct_channels, 1, 1
    # BLOCK_CO is 0 for a first-pass-only tile: two passes (:func:`one_pass`).
    return {"P": p, "SLOTS": slots, "BLOCK_CO": min(common.dot_size(out_channels), channels),
            "BLOCK_H": BLOCK_H, "BLOCK_K": tiles.block_k, "num_warps": tiles.warps, "maxnreg": tiles.maxnreg,
            "band_rows": band_rows, "images": images}


def one_pass(config: dict, out_channels: int) -> bool:
    """Whether one program holds every output channel (:func:`tile_config`'s block). Otherwise each output-channel
    block would recompute the expand and spatial conv of every other, so the block runs in two passes: the hidden
    tensor ``d`` written once (:func:`hidden`), then the projection as a 1×1 conv."""
    return config["BLOCK_CO"] >= out_channels


def forward(a: ConvBlockArgs, out: torch.Tensor, spatial: str, config: dict) -> torch.Tensor:
    """Writes the block's output into ``out`` (B, C_out, H_out, W_out), any strides; ``config`` is
    :func:`tile_config`'s for these shapes, and holds every output channel (:func:`one_pass`)."""
    _launch(a, out, spatial, config, store_hidden=False)
    return out


def hidden(a: ConvBlockArgs, spatial: str, config: dict, d: torch.Tensor) -> torch.Tensor:
    """The first of two passes: writes ``d = act2(conv_kxk(h) + b2)``, gated in GLU mode, (B, the projection's
    input channels, H_out, W_out), any strides, each chunk computed once. Before a projection the caller gives a
    channels-last ``d`` whatever x's layout: each pixel's chunk of channels is contiguous, so this pass stores and
    the projection loads 16 bytes at a time (in NCHW a map whose rows are not a multiple of 8 pixels allows no
    wider access than its alignment)."""
    _launch(a, d, spatial, {**config, "BLOCK_H": STORE_BLOCK_H, "BLOCK_CO": STORE_BLOCK_CO}, store_hidden=True)
    return d


def _launch(a: ConvBlockArgs, out: torch.Tensor, spatial: str, config: dict, store_hidden: bool) -> None:
    batch, in_channels, height, width = a.x.shape
    _, out_channels, out_height, out_width = out.shape
    w1 = a.w2 if a.w1 is None else a.w1
    b1, has_b1, _ = common.optional(a.b1, a.w2)
    b2, has_b2, _ = common.optional(a.b2, a.w2)
    w3 = a.w2 if a.w3 is None else a.w3  # without a projection (first pass only) never read
    b3, has_b3, _ = common.optional(a.b3, w3)
    residual, has_residual, r_strides = common.optional(None if store_hidden else a.residual, out)
    config = dict(config)
    band_rows, images = config.pop("band_rows"), config.pop("images")
    options = {"num_warps": config.pop("num_warps"), "maxnreg": config.pop("maxnreg")}
    # num_stages=1: the loops are short and their loads feed on-chip math, not a long GEMM to pipeline.
    if spatial == "expand_depthwise":
        bands = triton.cdiv(out_height, band_rows)
        tiles = triton.cdiv(batch, images) * bands
    else:
        bands = 1
        tiles = triton.cdiv(batch * out_height * out_width, config["P"])
    blocks = config["BLOCK_H"] if store_hidden else config["BLOCK_CO"]
    grid = (tiles, triton.cdiv(out_channels, blocks))
    _conv_block_fwd_kernel[grid](
        a.x, w1, b1, a.w2, b2, w3, b3, residual, out,
        batch, in_channels, a.projected, out_channels, height, width, out_height, out_width,
        *a.stride, *a.padding, band_rows, bands, images, has_b1, has_b2, has_b3, has_residual,
        *a.x.stride(), w1.stride(0), w1.stride(1), *a.w2.stride(), w3.stride(0), w3.stride(1), *r_strides,
        *out.stride(),
        SPATIAL=spatial, ACT1=a.act1, ACT2=a.act2, ACT3=a.act3, K=a.w2.shape[2], num_stages=1, **options,
        STORE_HIDDEN=store_hidden, GATED=a.gate is not None, ACT_GATE=a.gate or "none", **config,
        **common.dot_mode(a.compute_dtype()))


def compile_configs():
    """Every (kernel, signature, constexprs, options) the launcher can request, for CI's ahead-of-time sm_90
    compile: each spatial kind × dtype × tile × output-channel block × kernel size, and the GLU mode of the
    expand_depthwise kind (the only one the launcher gates), with one representative set of activations each (they
    change only elementwise code; conv_bn_act compiles every activation)."""
    pointers = ("x", "w1", "b1", "w2", "b2", "w3", "b3", "residual", "out")
    activations = {False: {"ACT1": "hardswish", "ACT2": "gelu_tanh", "ACT3": "none", "ACT_GATE": "none"},
                   True: {"ACT1": "silu", "ACT2": "none", "ACT3": "none", "ACT_GATE": "silu"}}  # GLUMBConv's
    for dtype, tiles in TILES.items():
        kinds = [("expand_depthwise", p, slots, channels, gated) for p, slots, channels in tiles.bands
                 for gated in (False, True)]
        kinds += [(kind, tiles.direct_pixels, 16, tiles.direct_channels, False) for kind in ("depthwise", "full")]
        for spatial, p, slots, widest, gated in kinds:
            # every dot_size up to widest in one pass, and the first of two
            passes = [(16 << i, False) for i in range((widest // 16).bit_length())] + [(STORE_BLOCK_CO, True)]
            for block_co, store_hidden in passes:
                for ksize in KERNEL_SIZES:
                    block_h = STORE_BLOCK_H if store_hidden else BLOCK_H
                    constexprs = {"SPATIAL": spatial, **activations[gated], "K": ksize, "SLOTS": slots, "P": p,
                                  "BLOCK_H": block_h, "BLOCK_K": tiles.block_k, "BLOCK_CO": block_co,
                                  "STORE_HIDDEN": store_hidden, "GATED": gated, **common.dot_mode(dtype)}
                    types = common.signature(_conv_block_fwd_kernel, common.POINTER_TYPES[dtype], constexprs, pointers)
                    yield _conv_block_fwd_kernel, types, constexprs, {"num_warps": tiles.warps, "num_stages": 1,
                                                                      "maxnreg": tiles.maxnreg}
