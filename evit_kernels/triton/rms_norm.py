"""Triton kernels of ``evit::rms_norm`` (forward; the gradient is the reference's): RMSNorm over the last dimension
of a view whose leading dimensions walk as rows of two strides (``evit_kernels.ops.rms_norm.rows``).

``_rms_norm_kernel``: each program owns BLOCK_R rows and walks the C channels twice in chunks of BLOCK_C: first the
fp32 sum of squares, then ``x · rsqrt(mean + eps) · weight + bias + residual`` in fp32, rounded once on store;
``CENTERED`` (a LayerNorm) walks them once more before, for the mean that x is then taken from (two passes over the
centered values, not E[x²] - E[x]², which cancels when the mean is large). The channels (and the residual's) are
read through their stride, so the channel view of an NCHW map (channel stride H·W, rows contiguous) and a
token-major (B, N, C) tensor (channel stride 1) take the same kernel without a copy; the later passes re-read x from
L1/L2.

Few rows (a Sana caption of 300 tokens, a DC-AE map of 32×32 pixels: fewer row blocks than the GPU has SMs) would
leave most SMs idle while a few programs walk long rows, so the channels are split (:func:`plan`):
``_rms_norm_stats_kernel`` writes each (channel slice, row)'s fp32 statistics (its sum of squares; centered, its sum
and its sum of squares about its own mean), and ``_rms_norm_apply_kernel``, on the same grid, combines every slice's
statistics of its rows (centered: Chan's pairwise formula, exact to rounding for any mean) and normalizes its slice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from evit_kernels.triton import _common as common
from evit_kernels.triton import split_sum
from evit_kernels.triton._common import POINTER_TYPES, signature

if TYPE_CHECKING:
    from evit_kernels.ops.rms_norm import RmsNormArgs

BLOCK_R = 32
SMALL_GRID_BLOCK_R = 8
BLOCK_C = 64
MAX_SLICES = 16
"""The most channel slices a split norm takes (a power of two: the slice axis of the apply kernel's tile)."""
PROGRAMS_PER_SM = 16
"""Programs of 4 warps an SM holds at once (64 warps): a split aims at this many programs per SM, one full wave."""


def plan(n_rows: int, channels: int) -> tuple[int, int]:
    """(rows per program, channel slices) for ``n_rows`` rows of ``channels``: BLOCK_R rows and one slice where that
    makes at least as many programs as the GPU has SMs (``common.SMS``); else SMALL_GRID_BLOCK_R rows, and the
    channels split into as many slices of whole BLOCK_C steps as bring the programs up to a full wave
    (:data:`PROGRAMS_PER_SM` per SM), at most :data:`MAX_SLICES`."""
    if common.cdiv(n_rows, BLOCK_R) >= common.SMS:
        return BLOCK_R, 1
    row_blocks = common.cdiv(n_rows, SMALL_GRID_BLOCK_R)
    steps = common.cdiv(channels, BLOCK_C)
    wanted = min(MAX_SLICES, steps, common.cdiv(PROGRAMS_PER_SM * common.SMS, row_blocks))
    return SMALL_GRID_BLOCK_R, split_sum.whole_slices(steps, wanted)


@triton.jit
def _row_offsets(rows, inner, outer_stride, inner_stride):
    """Element offsets of the first channel of ``rows`` (row r = o·inner + i at o·outer_stride + i·inner_stride)."""
    return (rows // inner) * outer_stride + (rows % inner) * inner_stride


@triton.jit
def _statistics(x_rows, x_sc, row_ok, length, CENTERED: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_C: tl.constexpr):
    """(sum, sum of squares about the mean) of the ``length`` channels from ``x_rows`` of each row, fp32; not
    ``CENTERED``: (0, sum of squares). (The sum is reduced once after its loop, not chunk by chunk: triton 3.6 fails to
    build the fp32 centered statistics kernel of a loop reducing every chunk.)"""
    total = tl.zeros((BLOCK_R,), dtype=tl.float32)
    if CENTERED:  # each lane sums its column of the chunks, the columns added once after the loop
        columns = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        for c0 in range(0, length, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask = row_ok[:, None] & (offs_c < length)[None, :]
            columns += tl.load(x_rows[:, None] + offs_c[None, :] * x_sc, mask=mask, other=0.0).to(tl.float32)
        total = tl.sum(columns, axis=1)
    mean = total / length
    squares = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, length, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask = row_ok[:, None] & (offs_c < length)[None, :]
        xv = tl.load(x_rows[:, None] + offs_c[None, :] * x_sc, mask=mask, other=0.0).to(tl.float32)
        xv = tl.where(mask, xv - mean[:, None], 0.0)  # padded channels add nothing
        squares += tl.sum(xv * xv, axis=1)
    return total, squares


@triton.jit
def _normalize(x_rows, r_rows, o_rows, weight, bias, out, x_sc, r_sc, o_sc, row_ok, c_start, c_end, mean, scale,
               has_weight, has_bias, has_residual, BLOCK_C: tl.constexpr):
    """Writes ``(x - mean) · scale · weight + bias + residual`` for channels [c_start, c_end) of each row."""
    for c0 in range(c_start, c_end, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < c_end
        mask = row_ok[:, None] & mask_c[None, :]
        xv = tl.load(x_rows[:, None] + offs_c[None, :] * x_sc, mask=mask, other=0.0).to(tl.float32)
        y = (xv - mean[:, None]) * scale[:, None]
        if has_weight != 0:
            y = y * tl.load(weight + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
        if has_bias != 0:
            y = y + tl.load(bias + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
        if has_residual != 0:
            y = y + tl.load(r_rows[:, None] + offs_c[None, :] * r_sc, mask=mask, other=0.0).to(tl.float32)
        tl.store(o_rows[:, None] + offs_c[None, :] * o_sc, y.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_kernel(x, weight, bias, residual, out, n_rows, channels, eps, has_weight, has_bias, has_residual,
                     x_inner, x_outer_stride, x_inner_stride, x_sc, r_inner, r_outer_stride, r_inner_stride, r_sc,
                     o_inner, o_outer_stride, o_inner_stride, o_sc, CENTERED: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    x_rows = x + _row_offsets(rows, x_inner, x_outer_stride, x_inner_stride)
    total, squares = _statistics(x_rows, x_sc, row_ok, channels, CENTERED=CENTERED, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C)
    _normalize(x_rows, residual + _row_offsets(rows, r_inner, r_outer_stride, r_inner_stride),
               out + _row_offsets(rows, o_inner, o_outer_stride, o_inner_stride), weight, bias, out, x_sc, r_sc, o_sc,
               row_ok, 0, channels, total / channels, tl.math.rsqrt(squares / channels + eps), has_weight, has_bias,
               has_residual, BLOCK_C=BLOCK_C)


@triton.jit
def _rms_norm_stats_kernel(x, stats, n_rows, channels, slice_length, x_inner, x_outer_stride, x_inner_stride, x_sc,
                           CENTERED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # stats: fp32 (2, slices, n_rows): each slice's sum (centered only) and sum of squares about its mean.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    c_start = tl.program_id(1) * slice_length
    total, squares = _statistics(x + _row_offsets(rows, x_inner, x_outer_stride, x_inner_stride) + c_start * x_sc,
                                 x_sc, row_ok, tl.minimum(slice_length, channels - c_start), CENTERED=CENTERED,
                                 BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C)
    at = stats + tl.program_id(1) * n_rows + rows
    if CENTERED:
        tl.store(at, total, mask=row_ok)
    tl.store(at + tl.num_programs(1) * n_rows, squares, mask=row_ok)


@triton.jit
def _rms_norm_apply_kernel(x, weight, bias, residual, out, stats, n_rows, channels, slice_length, eps, has_weight,
                           has_bias, has_residual, x_inner, x_outer_stride, x_inner_stride, x_sc, r_inner,
                           r_outer_stride, r_inner_stride, r_sc, o_inner, o_outer_stride, o_inner_stride, o_sc,
                           CENTERED: tl.constexpr, MAX_SLICES: tl.constexpr, BLOCK_R: tl.constexpr,
                           BLOCK_C: tl.constexpr):
    # Every slice's statistics of the program's rows, one (slice × row) load, combined by one fixed reduction over
    # the slices; then the program's own slice normalized.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    slices = tl.num_programs(1)
    offs_s = tl.arange(0, MAX_SLICES)
    at = stats + offs_s[:, None] * n_rows + rows[None, :]
    mask = (offs_s < slices)[:, None] & row_ok[None, :]
    squares = tl.load(at + slices * n_rows, mask=mask, other=0.0)
    mean = tl.zeros((BLOCK_R,), dtype=tl.float32)
    if CENTERED:  # Chan et al.: M2 = Σ M2_s + Σ n_s (mean_s - mean)²
        totals = tl.load(at, mask=mask, other=0.0)
        counts = tl.minimum(tl.maximum(channels - offs_s * slice_length, 0), slice_length).to(tl.float32)
        mean = tl.sum(totals, axis=0) / channels
        spread = totals / tl.maximum(counts, 1.0)[:, None] - mean[None, :]
        squares += counts[:, None] * spread * spread
    scale = tl.math.rsqrt(tl.sum(squares, axis=0) / channels + eps)
    c_start = tl.program_id(1) * slice_length
    _normalize(x + _row_offsets(rows, x_inner, x_outer_stride, x_inner_stride),
               residual + _row_offsets(rows, r_inner, r_outer_stride, r_inner_stride),
               out + _row_offsets(rows, o_inner, o_outer_stride, o_inner_stride), weight, bias, out, x_sc, r_sc, o_sc,
               row_ok, c_start, tl.minimum(c_start + slice_length, channels), mean, scale, has_weight, has_bias,
               has_residual, BLOCK_C=BLOCK_C)


def _walk(t: torch.Tensor) -> tuple[int, int, int, int]:
    """(inner, outer stride, inner stride, channel stride) of ``t``'s rows (the op's backend checked they exist)."""
    from evit_kernels.ops.rms_norm import rows

    _, inner, outer_stride, inner_stride = rows(t)
    return inner, outer_stride, inner_stride, t.stride(-1)


def forward(a: RmsNormArgs, out: torch.Tensor) -> torch.Tensor:
    channels = a.x.shape[-1]
    n_rows = a.x.numel() // channels
    # An absent weight, bias or residual passes x as a never-read pointer; the (C,) parameters are made contiguous
    # (no-op).
    weight = a.x if a.weight is None else a.weight.contiguous()
    bias = a.x if a.bias is None else a.bias.contiguous()
    residual = a.x if a.residual is None else a.residual
    block_r, slices = plan(n_rows, channels)
    flags = (int(a.weight is not None), int(a.bias is not None), int(a.residual is not None))
    walks = (*_walk(a.x), *_walk(residual), *_walk(out))
    if slices == 1:
        _rms_norm_kernel[(common.cdiv(n_rows, block_r),)](
            a.x, weight, bias, residual, out, n_rows, channels, a.eps, *flags, *walks, CENTERED=a.centered,
            BLOCK_R=block_r, BLOCK_C=BLOCK_C)
        return out
    grid = (common.cdiv(n_rows, block_r), slices)
    slice_length = split_sum.slice_length(channels, BLOCK_C, slices)
    stats = torch.empty((2, slices, n_rows), dtype=torch.float32, device=a.x.device)
    _rms_norm_stats_kernel[grid](a.x, stats, n_rows, channels, slice_length, *_walk(a.x), CENTERED=a.centered,
                                 BLOCK_R=block_r, BLOCK_C=BLOCK_C)
    _rms_norm_apply_kernel[grid](
        a.x, weight, bias, residual, out, stats, n_rows, channels, slice_length, a.eps, *flags, *walks,
        CENTERED=a.centered, MAX_SLICES=MAX_SLICES, BLOCK_R=block_r, BLOCK_C=BLOCK_C)
    return out


def compile_configs():
    """Every (kernel, signature, constexprs) the launcher can request, for the ahead-of-time sm_90 compile."""
    pointers = ("x", "weight", "bias", "residual", "out")
    for ptr in POINTER_TYPES.values():
        for centered in (False, True):
            for block_r in (BLOCK_R, SMALL_GRID_BLOCK_R):
                constexprs = {"CENTERED": centered, "BLOCK_R": block_r, "BLOCK_C": BLOCK_C}
                yield (_rms_norm_kernel, signature(_rms_norm_kernel, ptr, constexprs, pointers, {"eps": "fp32"}),
                       constexprs)
            constexprs = {"CENTERED": centered, "BLOCK_R": SMALL_GRID_BLOCK_R, "BLOCK_C": BLOCK_C}
            yield (_rms_norm_stats_kernel,
                   signature(_rms_norm_stats_kernel, ptr, constexprs, ("x",), {"stats": "*fp32"}), constexprs)
            constexprs = {**constexprs, "MAX_SLICES": MAX_SLICES}
            yield (_rms_norm_apply_kernel,
                   signature(_rms_norm_apply_kernel, ptr, constexprs, pointers,
                             {"eps": "fp32", "stats": "*fp32"}), constexprs)
