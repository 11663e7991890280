"""Triton kernel of ``evit::rms_norm`` (forward; the gradient is the reference's): RMSNorm over the last dimension
of a view whose leading dimensions walk as rows of two strides (``evit_kernels.ops.rms_norm.rows``).

Each program owns BLOCK_R rows (fewer when rows are few: :func:`block_rows`) and walks the C channels twice in
chunks of BLOCK_C: first the fp32 sum of squares, then ``x · rsqrt(mean + eps) · weight + bias + residual`` in
fp32, rounded once on store; ``CENTERED`` (a LayerNorm) walks them once more before, for the mean that x is then
taken from (two passes over the centered values, not E[x²] - E[x]², which cancels when the mean is large). The
channels (and the residual's) are read through their stride, so the channel view of an NCHW map (channel stride
H·W, rows contiguous) and a token-major (B, N, C) tensor (channel stride 1) take the same kernel without a copy;
the later passes re-read x from L1/L2.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from evit_kernels.triton import _common as common
from evit_kernels.triton._common import POINTER_TYPES, signature

if TYPE_CHECKING:
    from evit_kernels.ops.rms_norm import RmsNormArgs

BLOCK_R = 32
SMALL_GRID_BLOCK_R = 8
BLOCK_C = 64


def block_rows(n_rows: int) -> int:
    """The rows a program owns for ``n_rows`` rows: BLOCK_R, or SMALL_GRID_BLOCK_R (four times the programs) where
    BLOCK_R rows each would make fewer programs than the GPU has SMs (``common.SMS``; a caption of a few hundred
    tokens, a low-resolution map)."""
    return SMALL_GRID_BLOCK_R if triton.cdiv(n_rows, BLOCK_R) < common.SMS else BLOCK_R


@triton.jit
def _row_offsets(rows, inner, outer_stride, inner_stride):
    """Element offsets of the first channel of ``rows`` (row r = o·inner + i at o·outer_stride + i·inner_stride)."""
    return (rows // inner) * outer_stride + (rows % inner) * inner_stride


@triton.jit
def _rms_norm_kernel(x, weight, bias, residual, out, n_rows, channels, eps, has_weight, has_bias, has_residual,
                     x_inner, x_outer_stride, x_inner_stride, x_sc, r_inner, r_outer_stride, r_inner_stride, r_sc,
                     o_inner, o_outer_stride, o_inner_stride, o_sc, CENTERED: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    x_rows = x + _row_offsets(rows, x_inner, x_outer_stride, x_inner_stride)
    r_rows = residual + _row_offsets(rows, r_inner, r_outer_stride, r_inner_stride)
    o_rows = out + _row_offsets(rows, o_inner, o_outer_stride, o_inner_stride)
    mean = tl.zeros((BLOCK_R,), dtype=tl.float32)
    if CENTERED:
        for c0 in range(0, channels, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask = row_ok[:, None] & (offs_c < channels)[None, :]
            mean += tl.sum(tl.load(x_rows[:, None] + offs_c[None, :] * x_sc, mask=mask, other=0.0).to(tl.float32),
                           axis=1)
        mean = mean / channels
    squares = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, channels, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask = row_ok[:, None] & (offs_c < channels)[None, :]
        xv = tl.load(x_rows[:, None] + offs_c[None, :] * x_sc, mask=mask, other=0.0).to(tl.float32)
        xv = tl.where(mask, xv - mean[:, None], 0.0)  # padded channels add nothing
        squares += tl.sum(xv * xv, axis=1)
    scale = tl.math.rsqrt(squares / channels + eps)
    for c0 in range(0, channels, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < channels
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
    block_r = block_rows(n_rows)
    _rms_norm_kernel[(triton.cdiv(n_rows, block_r),)](
        a.x, weight, bias, residual, out, n_rows, channels, a.eps, int(a.weight is not None),
        int(a.bias is not None), int(a.residual is not None), *_walk(a.x), *_walk(residual), *_walk(out),
        CENTERED=a.centered, BLOCK_R=block_r, BLOCK_C=BLOCK_C)
    return out


def compile_configs():
    """Every (kernel, signature, constexprs) the launcher can request, for the ahead-of-time sm_90 compile."""
    pointers = ("x", "weight", "bias", "residual", "out")
    for ptr in POINTER_TYPES.values():
        for block_r in (BLOCK_R, SMALL_GRID_BLOCK_R):
            for centered in (False, True):
                constexprs = {"CENTERED": centered, "BLOCK_R": block_r, "BLOCK_C": BLOCK_C}
                yield (_rms_norm_kernel, signature(_rms_norm_kernel, ptr, constexprs, pointers, {"eps": "fp32"}),
                       constexprs)
