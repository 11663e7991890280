"""Triton kernels of ReLU linear attention for heads wider than :data:`COLUMN_BLOCK` (Sana-Video's d = 112),
forward and backward, with the math, layouts (:class:`Heads`) and rotated form of
:mod:`evit_kernels.triton.relu_linear_attention`.

There, one program holds a head's d×d fp32 matrices (kv; in the backward gkv too) in registers, with the IEEE
fp32 products on the FMA units. At d = 128 (112 padded) one such matrix is 64 KB, and an FMA product over 128
terms keeps its operands in every thread: the builds spill. Here every matrix is cut into W×W blocks
(W = ``COLUMN_BLOCK``) and no program holds more than one block column:

- forward reduction, per (batch·head, chunk, column block cb): kv[:, cb] = Σ_n k_n v_n[cb]ᵀ and z, as per-chunk
  partial sums (the products in the inputs' dtype, as the narrow kernels'); the chunks are then summed once
  (one small ``sum``) instead of in every program that reads them;
- forward apply, per (batch·head, chunk, cb): out[cb] = kv[:, cb]ᵀ q / (z·q + eps), the sum over the d
  components of q taken W at a time, each W×W block of kv read from the summed partials (L1/L2-resident);
- backward reduction, per (batch·head, chunk, cb): gkv[:, cb] and this block's share of gden_n and of gz (both
  linear in g·o, which splits over the column blocks); the gden shares are written per token;
- backward apply, per (batch·head, chunk, block b): rows b of ∂q = kv gnum + z gden and ∂k = gkv v + gz, and
  components b of ∂v = gkvᵀ k, each a sum of W×W block products.

So every product is a (W, W)·(W, BLOCK_N) one, as at d = 32, in IEEE fp32 where the narrow kernels use it: the
same accuracy as those.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from evit_kernels.triton._common import POINTER_TYPES, dot_mode, dot_size, signature
from evit_kernels.triton.relu_linear_attention import (
    WIDE_HEAD_DIMS,
    Heads,
    _chunking,
    _load_role,
    _program_span,
    _relu,
    _store_gradients,
    _sum_kv,
)

COLUMN_BLOCK = 32
"""W: the width of the matrix blocks, and the widest head the narrow kernels take whole."""
_REDUCE_BLOCK_N = 32
_APPLY_BLOCK_N = 32
_BACKWARD_BLOCK_N = 16
"""Token tiles (each divides the chunks, which are multiples of ``BLOCK_N``)."""


def _column_blocks(dim: int) -> int:
    return dot_size(dim) // COLUMN_BLOCK


def _slot_size(d_pad: int) -> int:
    """Floats of one column block's partial sums: the (d_pad, W) block column, then a (d_pad,) vector."""
    return d_pad * COLUMN_BLOCK + d_pad


@triton.jit
def _block(at, i_block, j_block, offs_w, D_PAD: tl.constexpr, W: tl.constexpr):
    """Block (i_block, j_block) of the (D_PAD, D_PAD) matrix whose summed block columns start at ``at``: (W, W)
    fp32, rows i_block·W + offs_w, columns j_block·W + offs_w."""
    return tl.load(at + j_block * (D_PAD * W + D_PAD) + (i_block * W + offs_w)[:, None] * W + offs_w[None, :])


@triton.jit
def _vector(at, block, offs, D_PAD: tl.constexpr, W: tl.constexpr):
    """Entries ``offs`` of the vector of block column ``block`` (z in every block column of kv; this column
    block's share of gz for gkv)."""
    return tl.load(at + block * (D_PAD * W + D_PAD) + D_PAD * W + offs)


@triton.jit
def _query_tiles(q, rotated_q, head_at, offs, offs_n, mask, stride_role, stride_c, stride_n, ROTATED: tl.constexpr):
    """Components ``offs`` of the ReLU'd q and of q̃ (q, or the rotated q) at tokens ``offs_n``, in fp32."""
    q_tile = _relu(_load_role(q + head_at, 0, offs, offs_n, mask, stride_role, stride_c, stride_n)).to(tl.float32)
    q_num = q_tile
    if ROTATED:
        q_num = _load_role(rotated_q + head_at, 0, offs, offs_n, mask, stride_role, stride_c, stride_n).to(tl.float32)
    return q_tile, q_num


@triton.jit
def _numerator_and_denominator(q, rotated_q, kv_at, block, head_at, offs_w, offs_n, tokens, eps, stride_role,
                               stride_c, stride_n, D: tl.constexpr, D_PAD: tl.constexpr, W: tl.constexpr,
                               BLOCK_N: tl.constexpr, ROTATED: tl.constexpr):
    """Components ``block`` of kvᵀ q̃_n, (W, BLOCK_N), and z·q_n + eps, (BLOCK_N,), both in fp32 (q̃ = q, or the
    rotated q), summed over q's components W at a time."""
    num = tl.zeros((W, BLOCK_N), dtype=tl.float32)
    den = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for kk in range(0, D_PAD // W):
        offs_k = kk * W + offs_w
        q_tile, q_num = _query_tiles(q, rotated_q, head_at, offs_k, offs_n, (offs_k < D)[:, None] & tokens[None, :],
                                     stride_role, stride_c, stride_n, ROTATED)
        num += tl.dot(tl.trans(_block(kv_at, kk, block, offs_w, D_PAD, W)), q_num, input_precision="ieee")
        den += tl.sum(_vector(kv_at, block, offs_k, D_PAD, W)[:, None] * q_tile, axis=0)
    return num, den + eps


@triton.jit
def _wide_fwd_reduce_kernel(k, v, rotated_k, partial, heads, n_tokens, per_chunk, chunks,
                            stride_b, stride_h, stride_role, stride_c, stride_n,
                            D: tl.constexpr, D_PAD: tl.constexpr, W: tl.constexpr, BLOCK_N: tl.constexpr,
                            PRECISION: tl.constexpr, UPCAST: tl.constexpr, ROTATED: tl.constexpr):
    row, chunk, b, h, start, end = _program_span(heads, per_chunk, n_tokens)
    block = tl.program_id(2)
    head_at = b * stride_b + h * stride_h
    offs_d = tl.arange(0, D_PAD)
    offs_w = tl.arange(0, W)
    offs_v = block * W + offs_w
    kv, z = _sum_kv(k, v, rotated_k, head_at, offs_d, offs_v, start, end, stride_role, stride_c, stride_n, D, D_PAD,
                    W, BLOCK_N, PRECISION, UPCAST, ROTATED)
    at = partial + ((row * chunks + chunk) * (D_PAD // W) + block) * (D_PAD * W + D_PAD)
    tl.store(at + offs_d[:, None] * W + offs_w[None, :], kv)
    tl.store(at + D_PAD * W + offs_d, z)


@triton.jit
def _wide_fwd_apply_kernel(q, rotated_q, summed, out, heads, first_head, n_tokens, per_chunk, eps,
                           stride_b, stride_h, stride_role, stride_c, stride_n, out_stride_b, out_stride_c,
                           out_stride_n, D: tl.constexpr, D_PAD: tl.constexpr, W: tl.constexpr,
                           BLOCK_N: tl.constexpr, ROTATED: tl.constexpr):
    row, chunk, b, h, start, end = _program_span(heads, per_chunk, n_tokens)
    block = tl.program_id(2)
    head_at = b * stride_b + h * stride_h
    kv_at = summed + row * (D_PAD // W) * (D_PAD * W + D_PAD)
    offs_w = tl.arange(0, W)
    offs_v = block * W + offs_w
    out_base = out + b * out_stride_b + (first_head + h) * D * out_stride_c
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        tokens = offs_n < end
        num, den = _numerator_and_denominator(q, rotated_q, kv_at, block, head_at, offs_w, offs_n, tokens, eps,
                                              stride_role, stride_c, stride_n, D, D_PAD, W, BLOCK_N, ROTATED)
        ptrs = out_base + offs_v[:, None] * out_stride_c + offs_n[None, :] * out_stride_n
        tl.store(ptrs, (num / den[None, :]).to(out.dtype.element_ty), mask=(offs_v < D)[:, None] & tokens[None, :])


@triton.jit
def _wide_bwd_reduce_kernel(q, rotated_q, grad, summed, grad_partial, token_partial, heads, first_head, n_tokens,
                            per_chunk, chunks, eps, stride_b, stride_h, stride_role, stride_c, stride_n, g_stride_b,
                            g_stride_c, g_stride_n, D: tl.constexpr, D_PAD: tl.constexpr, W: tl.constexpr,
                            BLOCK_N: tl.constexpr, ROTATED: tl.constexpr):
    row, chunk, b, h, start, end = _program_span(heads, per_chunk, n_tokens)
    block = tl.program_id(2)
    head_at = b * stride_b + h * stride_h
    kv_at = summed + row * (D_PAD // W) * (D_PAD * W + D_PAD)
    g_base = grad + b * g_stride_b + (first_head + h) * D * g_stride_c
    offs_d = tl.arange(0, D_PAD)
    offs_w = tl.arange(0, W)
    offs_v = block * W + offs_w
    gkv = tl.zeros((D_PAD, W), dtype=tl.float32)
    gz = tl.zeros((D_PAD,), dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        tokens = offs_n < end
        num, den = _numerator_and_denominator(q, rotated_q, kv_at, block, head_at, offs_w, offs_n, tokens, eps,
                                              stride_role, stride_c, stride_n, D, D_PAD, W, BLOCK_N, ROTATED)
        g = tl.load(g_base + offs_v[:, None] * g_stride_c + offs_n[None, :] * g_stride_n,
                    mask=(offs_v < D)[:, None] & tokens[None, :], other=0.0).to(tl.float32)
        gnum = g / den[None, :]
        gden = -tl.sum(gnum * num, axis=0) / den  # this block's share of -(g·o)/den, o = num/den
        tl.store(token_partial + (row * (D_PAD // W) + block) * n_tokens + offs_n, gden, mask=tokens)
        q_tile, q_num = _query_tiles(q, rotated_q, head_at, offs_d, offs_n, (offs_d < D)[:, None] & tokens[None, :],
                                     stride_role, stride_c, stride_n, ROTATED)
        gkv += tl.dot(q_num, tl.trans(gnum), input_precision="ieee")
        gz += tl.sum(q_tile * gden[None, :], axis=1)
    at = grad_partial + ((row * chunks + chunk) * (D_PAD // W) + block) * (D_PAD * W + D_PAD)
    tl.store(at + offs_d[:, None] * W + offs_w[None, :], gkv)
    tl.store(at + D_PAD * W + offs_d, gz)


@triton.jit
def _wide_bwd_apply_kernel(q, k, v, rotated_k, grad, summed, grad_summed, token_partial, grad_q, grad_k, grad_v,
                           grad_rotated_q, grad_rotated_k, heads, first_head, n_tokens, per_chunk, eps,
                           stride_b, stride_h, stride_role, stride_c, stride_n, g_stride_b, g_stride_c, g_stride_n,
                           gs_stride_b, gs_stride_h, gs_stride_role, gs_stride_c, gs_stride_n,
                           D: tl.constexpr, D_PAD: tl.constexpr, W: tl.constexpr, BLOCK_N: tl.constexpr,
                           ROTATED: tl.constexpr):
    row, chunk, b, h, start, end = _program_span(heads, per_chunk, n_tokens)
    block = tl.program_id(2)
    head_at = b * stride_b + h * stride_h
    kv_at = summed + row * (D_PAD // W) * (D_PAD * W + D_PAD)
    gkv_at = grad_summed + row * (D_PAD // W) * (D_PAD * W + D_PAD)
    g_base = grad + b * g_stride_b + (first_head + h) * D * g_stride_c
    gs_head_at = b * gs_stride_b + h * gs_stride_h
    offs_w = tl.arange(0, W)
    mine = block * W + offs_w  # the components this program writes
    z_mine = _vector(kv_at, 0, mine, D_PAD, W)
    gz_mine = tl.zeros((W,), dtype=tl.float32)
    for column_block in tl.static_range(D_PAD // W):
        gz_mine += _vector(gkv_at, column_block, mine, D_PAD, W)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        tokens = offs_n < end
        den = tl.zeros((BLOCK_N,), dtype=tl.float32)
        gden = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for kk in range(0, D_PAD // W):
            offs_k = kk * W + offs_w
            q_k = _relu(_load_role(q + head_at, 0, offs_k, offs_n, (offs_k < D)[:, None] & tokens[None, :],
                                   stride_role, stride_c, stride_n))
            den += tl.sum(_vector(kv_at, 0, offs_k, D_PAD, W)[:, None] * q_k.to(tl.float32), axis=0)
            gden += tl.load(token_partial + (row * (D_PAD // W) + kk) * n_tokens + offs_n, mask=tokens, other=0.0)
        den += eps
        gq_num = tl.zeros((W, BLOCK_N), dtype=tl.float32)
        gk_num = tl.zeros((W, BLOCK_N), dtype=tl.float32)
        gv = tl.zeros((W, BLOCK_N), dtype=tl.float32)
        for kk in range(0, D_PAD // W):
            offs_k = kk * W + offs_w
            mask = (offs_k < D)[:, None] & tokens[None, :]
            g = tl.load(g_base + offs_k[:, None] * g_stride_c + offs_n[None, :] * g_stride_n, mask=mask,
                        other=0.0).to(tl.float32)
            v_k = _load_role(v + head_at, 2, offs_k, offs_n, mask, stride_role, stride_c, stride_n).to(tl.float32)
            k_num = _relu(_load_role(k + head_at, 1, offs_k, offs_n, mask, stride_role, stride_c, stride_n))
            if ROTATED:
                k_num = _load_role(rotated_k + head_at, 1, offs_k, offs_n, mask, stride_role, stride_c, stride_n)
            gq_num += tl.dot(_block(kv_at, block, kk, offs_w, D_PAD, W), g / den[None, :], input_precision="ieee")
            gk_num += tl.dot(_block(gkv_at, block, kk, offs_w, D_PAD, W), v_k, input_precision="ieee")
            gv += tl.dot(tl.trans(_block(gkv_at, kk, block, offs_w, D_PAD, W)), k_num.to(tl.float32),
                         input_precision="ieee")
        mask_mine = (mine < D)[:, None] & tokens[None, :]
        q_mine = _load_role(q + head_at, 0, mine, offs_n, mask_mine, stride_role, stride_c, stride_n)
        k_mine = _load_role(k + head_at, 1, mine, offs_n, mask_mine, stride_role, stride_c, stride_n)
        gq = z_mine[:, None] * gden[None, :]
        gk = tl.zeros_like(gk_num) + gz_mine[:, None]
        _store_gradients(grad_q, grad_k, grad_v, grad_rotated_q, grad_rotated_k, gs_head_at, mine, offs_n, mask_mine,
                         gs_stride_role, gs_stride_c, gs_stride_n, q_mine, k_mine, gq, gq_num, gk, gk_num, gv, ROTATED)


_OPTIONS = {
    "_wide_fwd_reduce_kernel": {"num_warps": 8},
    "_wide_fwd_apply_kernel": {"num_warps": 4},
    "_wide_bwd_reduce_kernel": {"num_warps": 4, "num_stages": 1},
    "_wide_bwd_apply_kernel": {"num_warps": 8},
}
"""Launch options that keep each kernel's sm_90 build spill-free at d = 64 and 112 in every dtype, with and
without the rotated tiles (found by compiling the alternatives; registers near 255 either way)."""


def _shape_constexprs(dim: int) -> dict:
    return dict(D=dim, D_PAD=dot_size(dim), W=COLUMN_BLOCK)


def _partials(src: Heads, dim: int, chunks: int) -> torch.Tensor:
    """Scratch for per-chunk fp32 partial sums: (batch·heads, chunks, column blocks, slot)."""
    return torch.empty(src.batch * src.heads, chunks, _column_blocks(dim), _slot_size(dot_size(dim)),
                       device=src.q.device, dtype=torch.float32)


def _summed_kv(src: Heads, dim: int, per_chunk: int, chunks: int) -> torch.Tensor:
    """kv's block columns and z of every (batch, head), summed over the chunks: (batch·heads, column blocks,
    slot) fp32."""
    partial = _partials(src, dim, chunks)
    _wide_fwd_reduce_kernel[(partial.shape[0], chunks, _column_blocks(dim))](
        src.k, src.v, src.rotated_or_stand_ins()[1], partial, src.heads, src.n_tokens, per_chunk, chunks,
        *src.strides, BLOCK_N=_REDUCE_BLOCK_N, **_shape_constexprs(dim), **dot_mode(src.q.dtype), ROTATED=src.rotated,
        **_OPTIONS["_wide_fwd_reduce_kernel"])
    return partial.sum(dim=1)


def attend(src: Heads, out: torch.Tensor, out_strides: tuple[int, int, int], index: int, dim: int,
           eps: float) -> None:
    """:func:`evit_kernels.triton.relu_linear_attention.attend` for a head dim in ``WIDE_HEAD_DIMS``."""
    rows, blocks = src.batch * src.heads, _column_blocks(dim)
    per_chunk, chunks = _chunking(src.n_tokens, rows * blocks)
    summed = _summed_kv(src, dim, per_chunk, chunks)
    _wide_fwd_apply_kernel[(rows, chunks, blocks)](
        src.q, src.rotated_or_stand_ins()[0], summed, out, src.heads, index * src.heads, src.n_tokens, per_chunk,
        eps, *src.strides, *out_strides, BLOCK_N=_APPLY_BLOCK_N, **_shape_constexprs(dim), ROTATED=src.rotated,
        **_OPTIONS["_wide_fwd_apply_kernel"])


def backward_into(src: Heads, grad_out: torch.Tensor, g_strides: tuple[int, int, int], grads: Heads, index: int,
                  dim: int, eps: float) -> None:
    """:func:`evit_kernels.triton.relu_linear_attention.backward_into` for a head dim in ``WIDE_HEAD_DIMS``."""
    rows, blocks = src.batch * src.heads, _column_blocks(dim)
    per_chunk, chunks = _chunking(src.n_tokens, rows * blocks)
    summed = _summed_kv(src, dim, per_chunk, chunks)
    grad_partial = _partials(src, dim, chunks)
    token_partial = torch.empty(rows, blocks, src.n_tokens, device=src.q.device, dtype=torch.float32)
    constexprs = dict(BLOCK_N=_BACKWARD_BLOCK_N, **_shape_constexprs(dim), ROTATED=src.rotated)
    rotated_q, rotated_k = src.rotated_or_stand_ins()
    _wide_bwd_reduce_kernel[(rows, chunks, blocks)](
        src.q, rotated_q, grad_out, summed, grad_partial, token_partial, src.heads, index * src.heads, src.n_tokens,
        per_chunk, chunks, eps, *src.strides, *g_strides, **constexprs, **_OPTIONS["_wide_bwd_reduce_kernel"])
    _wide_bwd_apply_kernel[(rows, chunks, blocks)](
        src.q, src.k, src.v, rotated_k, grad_out, summed, grad_partial.sum(dim=1), token_partial, grads.q, grads.k,
        grads.v, *grads.rotated_or_stand_ins(), src.heads, index * src.heads, src.n_tokens, per_chunk, eps,
        *src.strides, *g_strides, *grads.strides, **constexprs, **_OPTIONS["_wide_bwd_apply_kernel"])


def compile_configs():
    """Every (kernel, signature, constexprs, options) the launchers above can request, for CI's ahead-of-time sm_90
    builds."""
    pointers = ("q", "k", "v", "rotated_q", "rotated_k", "out", "grad", "grad_q", "grad_k", "grad_v",
                "grad_rotated_q", "grad_rotated_k")
    for dtype, ptr in POINTER_TYPES.items():
        for dim in WIDE_HEAD_DIMS:
            for rotated in (False, True):
                shape = {**_shape_constexprs(dim), "ROTATED": rotated}
                backward = {**shape, "BLOCK_N": _BACKWARD_BLOCK_N}
                for kernel, constexprs in ((_wide_fwd_reduce_kernel, {**shape, "BLOCK_N": _REDUCE_BLOCK_N,
                                                                      **dot_mode(dtype)}),
                                           (_wide_fwd_apply_kernel, {**shape, "BLOCK_N": _APPLY_BLOCK_N}),
                                           (_wide_bwd_reduce_kernel, backward), (_wide_bwd_apply_kernel, backward)):
                    # Partial sums are fp32 scratch, eps an fp32 scalar.
                    special = {name: "*fp32" for name in kernel.arg_names
                               if "partial" in name or "summed" in name} | {"eps": "fp32"}
                    yield (kernel, signature(kernel, ptr, constexprs, pointers, special), constexprs,
                           _OPTIONS[kernel.__name__])
