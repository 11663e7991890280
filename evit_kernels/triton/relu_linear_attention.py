"""Triton kernels of ReLU linear attention (LiteMLA's core), forward and backward.

Each source tensor (the module's qkv map, then each aggregated map) is (B, 3·heads·d, H, W) with the channels
of head h at [h·3d, h·3d + 3d) ordered q, k, v. Per (batch, head), with q and k through ReLU:

    kv = Σ_n k_n v_nᵀ (d×d),  z = Σ_n k_n (d),  out_n = kvᵀ q_n / (z·q_n + eps)

Two passes each way, both split over N so that batch 1 at high resolution and large batches at 7×7 fill the
GPU: a reduction pass writes per-chunk fp32 partial sums (scratch O(B·heads·chunks·d²), chunks bounded by
``_TARGET_PROGRAMS``, never O(N)); an apply pass sums them and streams the tokens once. Where the tokens make
one chunk (a 7×7 map at any batch; 14×14 once batch·heads reaches ``_TARGET_PROGRAMS``), the forward runs both
passes in one program per (batch, head) instead (the ``_one_pass`` kernels; for aggregated sources fp16/bf16
only, :func:`_aggregated_one_pass_block`): no partial sums in memory, one launch; on an NCHW map of a few tokens
(7×7) whose heads start at aligned addresses, each head's q, k, v and output move as one flat run each, gathered
into tiles on chip (:meth:`Heads.whole_rows` has the conditions). Inputs are
read in place (any batch/channel stride, H·W flattenable: contiguous or channels_last), nothing is concatenated,
padded or copied to fp32; ReLU, the fp32 accumulation and the fp32 division happen in registers. fp32 dot
products use IEEE precision (no TF32), so fp32 results match the reference to rounding.

Backward (g = ∂L/∂out): with den_n = z·q_n + eps, o_n = out_n, gnum_n = g_n / den_n and
gden_n = -(g_n·o_n) / den_n, the reduction pass accumulates gkv = Σ_n q_n gnum_nᵀ and gz = Σ_n q_n gden_n; the
apply pass writes ∂q_n = (kv gnum_n + z gden_n)·[q_n > 0], ∂k_n = (gkv v_n + gz)·[k_n > 0], ∂v_n = gkvᵀ k_n.

Layouts (:class:`Heads`): the kernels read q, k and v through three pointers and the strides (batch, head, role,
channel, token). LiteMLA's map passes one tensor three times with the role stride d·(channel stride)
(:func:`channel_major`); Sana's token-major (B, N, heads·d) projections pass three tensors with role stride 0 and
channel stride 1 (:func:`token_major`), read where the projections leave them, without transposes.

Rotated form (``ROTATED``, Sana-Video): the numerator takes given tensors q̃, k̃ (the rotary embedding of the
ReLU'd q and k, used as they are) in place of q and k, kv = Σ_n k̃_n v_nᵀ and kvᵀ q̃_n, while z and the
denominator keep the ReLU'd q and k. The backward splits accordingly: ∂q̃_n = kv gnum_n, ∂q_n = z gden_n·[q_n > 0],
gkv = Σ_n q̃_n gnum_nᵀ, ∂k̃_n = gkv v_n, ∂k_n = gz·[k_n > 0], ∂v_n = gkvᵀ k̃_n.

Aggregated sources (inference, :func:`forward_aggregated`): an aggregated map is a depthwise K×K conv of qkv
(zero padding K//2) followed by one d×d matrix per (head, role), so each token tile of one head's q, k or v is
computed on the fly from qkv (K² masked neighbour loads of that role's d channels, then a d×d dot) and the map
is never written. q and k/v use disjoint channels: the reduction pass computes only k and v, the apply pass
(or the one-pass kernel's second loop) only q. The kv/z accumulation and the output are the same helpers as for
a stored source.

Heads wider than ``COLUMN_BLOCK`` (64, and Sana-Video's 112; the ``_wide_*`` kernels): the kernels above hold a
head's d×d fp32 matrices (kv; in the backward gkv too) in registers, with the IEEE fp32 products on the FMA units.
At d = 128 (112 padded) one such matrix is 64 KB, and an FMA product over 128 terms keeps its operands in every
thread: the builds spill. Here every matrix is cut into W×W blocks (W = ``COLUMN_BLOCK``) and no program holds more
than one block column:

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
same accuracy as those. Each wide kernel has its own launch options (``_WIDE_OPTIONS``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from evit_kernels.triton import _common as common
from evit_kernels.triton._common import POINTER_TYPES, cdiv, compiled_dot_modes, dot_mode, dot_size, signature

WHOLE_MAX_TOKENS = 64
"""The token tile of the one-pass kernels where each role of a head is one dense run taken whole
(:meth:`Heads.whole_rows`), and so the most tokens they take that way, but for heads of 16 channels."""
WHOLE_NARROW_MAX_TOKENS = 128
"""The most tokens the one-pass kernels take whole for heads of 16 channels (9×9, 10×10 and 11×11 maps), in a tile
of this many on 8 warps (:func:`_whole_tiles`)."""
_TARGET_PROGRAMS = 512  # about four waves of 132 SMs (_common.SMS): split N until (batch·heads·chunks) reaches this
BLOCK_N = 64


def flattenable(t: torch.Tensor) -> bool:
    """Whether (H, W) can be walked as one token index n with a single stride (contiguous or channels_last)."""
    return t.dim() == 4 and (t.shape[2] == 1 or t.stride(2) == t.shape[3] * t.stride(3))


def _heavy_block(d_pad: int, dtype: torch.dtype, rotated: bool = False) -> int:
    """Token tile of the kernels that hold several fp32 tiles at once (the backward ones: four d×d matrices; the
    aggregated-source ones: the depthwise tile, its pointwise product and kv): wide heads take fewer tokens (at
    d = 32 a 64-token tile spills registers on sm_90, and a 32-token one still does for fp32 inputs, or with the
    rotated form's two extra tiles)."""
    if d_pad <= 16:
        return BLOCK_N
    return BLOCK_N // 4 if dtype == torch.float32 or rotated else BLOCK_N // 2


def _apply_block(d_pad: int) -> int:
    """Token tile of the forward's apply pass: half a block at d = 32, where kv and the q tile (two of them in the
    rotated form) fill the registers: with 64 tokens it spills on sm_90 (under triton 3.6 in every dtype, under 3.8
    in the rotated form). Divides every chunk."""
    return BLOCK_N // 2 if d_pad > 16 else BLOCK_N


def _whole_builds(dim: int, dtype: torch.dtype) -> bool:
    """Whether the one-pass kernel is built for heads of ``dim`` channels taken whole (``WHOLE_ROWS``): not for fp32 at
    32 channels, whose (32, 64) fp32 tiles beside the flat run spill (sm_90): 892 bytes on 4 warps, 16 on 8 (the TF32
    build without the JIT's specialization)."""
    return dtype != torch.float32 or dot_size(dim) <= 16


def _whole_tiles(dim: int) -> tuple[int, ...]:
    """The token tiles of the one-pass kernels' builds taking heads of ``dim`` channels whole: the wider one only at
    16 channels (B0's and B1's heads), where it builds without spills on 8 warps (sm_90, triton 3.6 and 3.8); at 8 the
    linear attention's generic bf16 build spills 32 bytes, at 32 (64-token tiles already on 8 warps) it would not
    fit."""
    return (WHOLE_MAX_TOKENS, WHOLE_NARROW_MAX_TOKENS) if dim == 16 else (WHOLE_MAX_TOKENS,)


def _whole_tile(n_tokens: int) -> int:
    """The token tile of the one-pass kernels taking ``n_tokens`` whole: :data:`WHOLE_MAX_TOKENS` where they fit it,
    else :data:`WHOLE_NARROW_MAX_TOKENS`."""
    return WHOLE_MAX_TOKENS if n_tokens <= WHOLE_MAX_TOKENS else WHOLE_NARROW_MAX_TOKENS


def _whole_warps(dim: int, tile: int) -> int:
    """Warps of the one-pass kernels taking heads of ``dim`` channels whole in tiles of ``tile`` tokens: 8 at 32
    channels, whose build on 4 warps takes 166 registers as the JIT specializes a 7×7 map's launch (bf16, sm_90) but
    spills 400 bytes (fp16, triton 3.8) built without that specialization, as CI compiles every configuration (on 8:
    190 registers, 1 CTA per SM, 16-byte accesses), and 8 for the 128-token tile (a run of 2048 elements, still 8 a
    thread); 4 below, where 8 would halve the accesses' width (4 elements a thread)."""
    return 8 if dot_size(dim) > 16 or tile > WHOLE_MAX_TOKENS else 4


def _chunking(n_tokens: int, programs: int) -> tuple[int, int]:
    """(tokens per chunk, chunks) for ``programs`` (batch·heads) independent reductions over ``n_tokens``."""
    blocks = cdiv(n_tokens, BLOCK_N)
    chunks = max(1, min(blocks, cdiv(_TARGET_PROGRAMS, programs)))
    per_chunk = cdiv(blocks, chunks) * BLOCK_N
    return per_chunk, cdiv(n_tokens, per_chunk)


@triton.jit
def _relu(x):
    # NaN maps to 0 here, where torch.relu keeps it: the NaN-keeping form spills registers in the backward (sm_90).
    return tl.where(x > 0, x, tl.zeros_like(x))


@triton.jit
def _load_role(src, head_at, role, offs_d, offs_n, mask, stride_role, stride_c, stride_n,
               TOKEN_RUN: tl.constexpr = 1, WHOLE_ROWS: tl.constexpr = 0):
    """The (D_PAD, BLOCK_N) tile of role 0 (q), 1 (k) or 2 (v) of one head, zero outside ``mask``: ``src`` is the
    role's tensor, ``head_at`` the offset of the head's first channel (one tensor for all three roles with
    ``stride_role`` between them in the channel-major layout, three tensors with ``stride_role`` 0 in the token-major
    one). ``TOKEN_RUN``: :meth:`Heads.token_run` (and ``mask`` from :func:`_token_mask`). ``WHOLE_ROWS`` (not 0): the
    role's first ``WHOLE_ROWS`` channels are one dense run of which the tile takes every token
    (:meth:`Heads.whole_rows`, :func:`_whole_role`)."""
    if WHOLE_ROWS:
        return _whole_role(src, head_at + role * stride_role, offs_d, offs_n, mask, stride_c, WHOLE_ROWS)
    if TOKEN_RUN > 1:
        at = common.tile_pointers(src, offs_n * stride_n, head_at + role * stride_role + offs_d * stride_c, True,
                                  TOKEN_RUN)
        return tl.load(at, mask=mask, other=0.0)
    # Without runs, the pointers built step by step, in this order, as before the runs came in: otherwise the wide
    # kernels' fp32 build at d = 64 with the rotated tiles spills 12 bytes (sm_90).
    ptrs = src + head_at + role * stride_role + offs_d[:, None] * stride_c + offs_n[None, :] * stride_n
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _whole_role(src, at, offs_c, offs_n, mask, n_tokens, ROWS: tl.constexpr):
    """The (rows ``offs_c``, tokens ``offs_n``) tile, zero outside ``mask``, of one role whose ``ROWS`` × ``n_tokens``
    elements are one dense run from ``at`` (an NCHW map: channel stride ``n_tokens``, token stride 1, every token in
    the tile): the run loaded flat, in wide accesses wherever its start is aligned, then gathered into the tile on
    chip. Read tile by tile, a map whose token count is no multiple of 4 (7×7) has no two adjacent tokens at an
    aligned address: every element is its own 2-byte access."""
    run = _load_run(src + at, ROWS * n_tokens, offs_c.shape[0] * offs_n.shape[0])
    return _gather_tile(run, offs_c[:, None] * n_tokens + offs_n[None, :], mask)


@triton.jit
def _load_run(start, length, SIZE: tl.constexpr):
    """The ``length`` elements from ``start`` as one flat (SIZE,) run (zero beyond them): wide accesses wherever
    ``start`` is aligned."""
    flat = tl.arange(0, SIZE)
    return tl.load(start + flat, mask=flat < length, other=0.0)


@triton.jit
def _gather_tile(run, index, mask):
    """The 2-D tile of the flat on-chip ``run``'s elements (:func:`_load_run`, as many as the tile) at the positions
    ``index``, zero outside ``mask``, gathered on chip."""
    tile = tl.gather(run, tl.reshape(tl.where(mask, index, 0), [run.shape[0]]), 0)
    tile = tl.reshape(tile, [index.shape[0], index.shape[1]])
    return tl.where(mask, tile, tl.zeros_like(tile))


@triton.jit
def _store_whole(out, at, tile, n_tokens, ROWS: tl.constexpr):
    """Store the (D_PAD, BLOCK_N) ``tile`` of all of a head's tokens as the dense ``ROWS`` × ``n_tokens`` run from
    ``at`` (see :func:`_whole_role`): gathered into the run's order on chip, then stored flat."""
    flat = tl.arange(0, tile.shape[0] * tile.shape[1])
    valid = flat < ROWS * n_tokens
    index = tl.where(valid, (flat // n_tokens) * tile.shape[1] + flat % n_tokens, 0)
    tl.store(out + at + flat, tl.gather(tl.reshape(tile, [flat.shape[0]]), index, 0), mask=valid)


@triton.jit
def _token_mask(rows_ok, tokens, TOKEN_RUN: tl.constexpr):
    """The (rows, tokens) mask of a tile, the same across each run of ``TOKEN_RUN`` tokens."""
    return common.tile_mask(tokens, rows_ok, True, TOKEN_RUN)


@triton.jit
def _sum_partials(ptr, row, chunks, offs_d, D_PAD: tl.constexpr):
    """Σ over chunks of the (D_PAD, D_PAD) fp32 partial matrices and (D_PAD,) partial vectors of ``row``."""
    mat = tl.zeros((D_PAD, D_PAD), dtype=tl.float32)
    vec = tl.zeros((D_PAD,), dtype=tl.float32)
    stride_chunk = D_PAD * D_PAD + D_PAD
    for c in range(0, chunks):
        at = ptr + (row * chunks + c) * stride_chunk
        mat += tl.load(at + offs_d[:, None] * D_PAD + offs_d[None, :])
        vec += tl.load(at + D_PAD * D_PAD + offs_d)
    return mat, vec


@triton.jit
def _store_partial(ptr, row, chunk, chunks, mat, vec, offs_d, D_PAD: tl.constexpr):
    at = ptr + (row * chunks + chunk) * (D_PAD * D_PAD + D_PAD)
    tl.store(at + offs_d[:, None] * D_PAD + offs_d[None, :], mat)
    tl.store(at + D_PAD * D_PAD + offs_d, vec)


@triton.jit
def _output_terms(q_num, q, kv, z, eps, PRECISION: tl.constexpr):
    """(numerator kvᵀ q_num, denominator z·q + eps) in fp32 for (D_PAD, BLOCK_N) tiles: ``q`` ReLU'd, ``q_num`` the
    same tile or, in the rotated form, the rotated q."""
    num = tl.dot(tl.trans(kv), q_num.to(tl.float32), input_precision=PRECISION)
    den = tl.sum(z[:, None] * q.to(tl.float32), axis=0) + eps
    return num, den


@triton.jit
def _accumulate_kv(k_num, k, v, kv, z, PRECISION: tl.constexpr):
    """kv + k_num vᵀ and z + Σ_n k for (D_PAD, BLOCK_N) tiles, zero outside the tokens: ``k`` ReLU'd, ``k_num`` the
    same tile or, in the rotated form, the rotated k."""
    kv += tl.dot(k_num, tl.trans(v), input_precision=PRECISION)
    z += tl.sum(k.to(tl.float32), axis=1)
    return kv, z


@triton.jit
def _store_output(q_num, q, kv, z, eps, out, out_at, offs_d, offs_n, mask, out_stride_c, out_stride_n,
                  PRECISION: tl.constexpr, TOKEN_RUN: tl.constexpr, WHOLE_ROWS: tl.constexpr = 0):
    """Write kvᵀ q_num_n / (z·q_n + eps) for (D_PAD, BLOCK_N) tiles (see :func:`_output_terms`), rounded once to
    the output dtype, into ``out`` from the head's offset ``out_at``; ``WHOLE_ROWS`` as for :func:`_load_role`
    (:func:`_store_whole`)."""
    num, den = _output_terms(q_num, q, kv, z, eps, PRECISION)
    if WHOLE_ROWS:
        return _store_whole(out, out_at, (num / den[None, :]).to(out.dtype.element_ty), out_stride_c, WHOLE_ROWS)
    if TOKEN_RUN > 1:
        ptrs = common.tile_pointers(out, offs_n * out_stride_n, out_at + offs_d * out_stride_c, True, TOKEN_RUN)
    else:  # step by step, as :func:`_load_role`
        ptrs = out + out_at + offs_d[:, None] * out_stride_c + offs_n[None, :] * out_stride_n
    tl.store(ptrs, (num / den[None, :]).to(out.dtype.element_ty), mask=mask)


@triton.jit
def _program_span(heads, per_chunk, n_tokens):
    """This program's (row = batch·heads + head, chunk, batch, head) and its tokens [start, end)."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    start = chunk * per_chunk
    return row, chunk, row // heads, row % heads, start, tl.minimum(start + per_chunk, n_tokens)


@triton.jit
def _sum_kv(k, v, rotated_k, head_at, offs_d, offs_v, start, end, stride_role, stride_c, stride_n, D: tl.constexpr,
            D_PAD: tl.constexpr, W: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
            UPCAST: tl.constexpr, ROTATED: tl.constexpr, TOKEN_RUN: tl.constexpr = 1, WHOLE_ROWS: tl.constexpr = 0):
    """Columns ``offs_v`` (W of them) of kv = Σ k_num vᵀ, (D_PAD, W), and z = Σ k, over tokens [start, end) of one
    head, in fp32: ``k_num`` the ReLU'd k or, in the rotated form, the rotated k; the products in the inputs' dtype
    (``PRECISION``, ``UPCAST``: :func:`evit_kernels.triton._common.dot_mode`). ``WHOLE_ROWS``: see
    :func:`_load_role`."""
    kv = tl.zeros((D_PAD, W), dtype=tl.float32)
    z = tl.zeros((D_PAD,), dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        tokens = offs_n < end
        mask = _token_mask(offs_d < D, tokens, TOKEN_RUN)
        k_tile = _relu(_load_role(k, head_at, 1, offs_d, offs_n, mask, stride_role, stride_c, stride_n, TOKEN_RUN,
                                  WHOLE_ROWS))
        v_tile = _load_role(v, head_at, 2, offs_v, offs_n, _token_mask(offs_v < D, tokens, TOKEN_RUN), stride_role,
                            stride_c, stride_n, TOKEN_RUN, WHOLE_ROWS)
        k_num = k_tile
        if ROTATED:
            k_num = _load_role(rotated_k, head_at, 1, offs_d, offs_n, mask, stride_role, stride_c, stride_n,
                               TOKEN_RUN, WHOLE_ROWS)
        if UPCAST:
            k_num = k_num.to(tl.float32)
            v_tile = v_tile.to(tl.float32)
        kv, z = _accumulate_kv(k_num, k_tile, v_tile, kv, z, PRECISION)
    return kv, z


@triton.jit
def _rla_fwd_reduce_kernel(k, v, rotated_k, partial, heads, n_tokens, per_chunk, chunks,
                           stride_b, stride_h, stride_role, stride_c, stride_n,
                           D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                           UPCAST: tl.constexpr, ROTATED: tl.constexpr, TOKEN_RUN: tl.constexpr):
    row, chunk, b, h, start, end = _program_span(heads, per_chunk, n_tokens)
    head_at = b * stride_b + h * stride_h
    offs_d = tl.arange(0, D_PAD)
    kv, z = _sum_kv(k, v, rotated_k, head_at, offs_d, offs_d, start, end, stride_role, stride_c, stride_n, D, D_PAD,
                    D_PAD, BLOCK_N, PRECISION, UPCAST, ROTATED, TOKEN_RUN)
    _store_partial(partial, row, chunk, chunks, kv, z, offs_d, D_PAD)


@triton.jit
def _apply_span(q, rotated_q, kv, z, eps, head_at, out, out_at, offs_d, start, end, stride_role, stride_c, stride_n,
                out_stride_c, out_stride_n, D: tl.constexpr, BLOCK_N: tl.constexpr, ROTATED: tl.constexpr,
                TOKEN_RUN: tl.constexpr, WHOLE_ROWS: tl.constexpr = 0):
    """Write the output of one head at tokens [start, end) from its summed kv and z (IEEE fp32 products).
    ``WHOLE_ROWS``: see :func:`_load_role`, for q and the output."""
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask = _token_mask(offs_d < D, offs_n < end, TOKEN_RUN)
        q_tile = _relu(_load_role(q, head_at, 0, offs_d, offs_n, mask, stride_role, stride_c, stride_n, TOKEN_RUN,
                                  WHOLE_ROWS))
        q_num = q_tile
        if ROTATED:
            q_num = _load_role(rotated_q, head_at, 0, offs_d, offs_n, mask, stride_role, stride_c, stride_n,
                               TOKEN_RUN, WHOLE_ROWS)
        _store_output(q_num, q_tile, kv, z, eps, out, out_at, offs_d, offs_n, mask, out_stride_c, out_stride_n, "ieee",
                      TOKEN_RUN, WHOLE_ROWS)


@triton.jit
def _rla_fwd_apply_kernel(q, rotated_q, partial, out, heads, first_head, n_tokens, per_chunk, chunks, eps,
                          stride_b, stride_h, stride_role, stride_c, stride_n, out_stride_b, out_stride_c,
                          out_stride_n, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                          ROTATED: tl.constexpr, TOKEN_RUN: tl.constexpr):
    row, chunk, b, h, start, end = _program_span(heads, per_chunk, n_tokens)
    head_at = b * stride_b + h * stride_h
    out_at = b * out_stride_b + (first_head + h) * D * out_stride_c
    offs_d = tl.arange(0, D_PAD)
    kv, z = _sum_partials(partial, row, chunks, offs_d, D_PAD)
    _apply_span(q, rotated_q, kv, z, eps, head_at, out, out_at, offs_d, start, end, stride_role, stride_c, stride_n,
                out_stride_c, out_stride_n, D, BLOCK_N, ROTATED, TOKEN_RUN)


@triton.jit
def _rla_fwd_one_pass_kernel(q, k, v, rotated_q, rotated_k, out, heads, first_head, n_tokens, eps,
                             stride_b, stride_h, stride_role, stride_c, stride_n, out_stride_b, out_stride_c,
                             out_stride_n, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                             PRECISION: tl.constexpr, UPCAST: tl.constexpr, ROTATED: tl.constexpr,
                             TOKEN_RUN: tl.constexpr, WHOLE_ROWS: tl.constexpr):
    """Both passes in one program per (batch, head), where the tokens are not split (one chunk): kv and z over
    all tokens, then the output, with no partial sums in memory and one launch instead of two. ``WHOLE_ROWS``: D
    where every role's and the output's D channels are one dense run taken in one tile (:meth:`Heads.whole_rows`),
    else 0."""
    b = tl.program_id(0) // heads
    h = tl.program_id(0) % heads
    head_at = b * stride_b + h * stride_h
    offs_d = tl.arange(0, D_PAD)
    kv, z = _sum_kv(k, v, rotated_k, head_at, offs_d, offs_d, 0, n_tokens, stride_role, stride_c, stride_n, D, D_PAD,
                    D_PAD, BLOCK_N, PRECISION, UPCAST, ROTATED, TOKEN_RUN, WHOLE_ROWS)
    out_at = b * out_stride_b + (first_head + h) * D * out_stride_c
    _apply_span(q, rotated_q, kv, z, eps, head_at, out, out_at, offs_d, 0, n_tokens, stride_role, stride_c, stride_n,
                out_stride_c, out_stride_n, D, BLOCK_N, ROTATED, TOKEN_RUN, WHOLE_ROWS)


@triton.jit
def _rla_bwd_reduce_kernel(q, rotated_q, grad, partial, grad_partial, heads, first_head, n_tokens, per_chunk,
                           chunks, eps, stride_b, stride_h, stride_role, stride_c, stride_n, g_stride_b, g_stride_c,
                           g_stride_n, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                           ROTATED: tl.constexpr):
    row, chunk, b, h, start, end = _program_span(heads, per_chunk, n_tokens)
    head_at = b * stride_b + h * stride_h
    g_base = grad + b * g_stride_b + (first_head + h) * D * g_stride_c
    offs_d = tl.arange(0, D_PAD)
    kv, z = _sum_partials(partial, row, chunks, offs_d, D_PAD)
    gkv = tl.zeros((D_PAD, D_PAD), dtype=tl.float32)
    gz = tl.zeros((D_PAD,), dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask = (offs_d < D)[:, None] & (offs_n < end)[None, :]
        q_tile = _relu(_load_role(q, head_at, 0, offs_d, offs_n, mask, stride_role, stride_c, stride_n))
        q_tile = q_tile.to(tl.float32)
        q_num = q_tile
        if ROTATED:
            q_num = _load_role(rotated_q, head_at, 0, offs_d, offs_n, mask, stride_role, stride_c, stride_n)
            q_num = q_num.to(tl.float32)
        g = tl.load(g_base + offs_d[:, None] * g_stride_c + offs_n[None, :] * g_stride_n, mask=mask,
                    other=0.0).to(tl.float32)
        num, den = _output_terms(q_num, q_tile, kv, z, eps, "ieee")
        gnum = g / den[None, :]
        gden = -tl.sum(gnum * num, axis=0) / den  # -(g·o)/den with o = num/den
        gkv += tl.dot(q_num, tl.trans(gnum), input_precision="ieee")
        gz += tl.sum(q_tile * gden[None, :], axis=1)
    _store_partial(grad_partial, row, chunk, chunks, gkv, gz, offs_d, D_PAD)


@triton.jit
def _store_gradients(grad_q, grad_k, grad_v, grad_rotated_q, grad_rotated_k, gs_head_at, offs_c, offs_n, mask,
                     gs_stride_role, gs_stride_c, gs_stride_n, q_raw, k_raw, gq, gq_num, gk, gk_num, gv,
                     ROTATED: tl.constexpr):
    """Write components ``offs_c`` of the gradients of one head's token tile, each rounded once: of q and k, the
    denominator's terms (``gq``, ``gk``) through the ReLU's mask (``q_raw``, ``k_raw``: the inputs), plus the
    numerator's (``gq_num``, ``gk_num``), which in the rotated form go to the rotated tensors without the mask
    (they are used as given); of v, ``gv``."""
    ty = grad_q.dtype.element_ty
    at = gs_head_at + offs_c[:, None] * gs_stride_c + offs_n[None, :] * gs_stride_n
    if ROTATED:
        tl.store(grad_rotated_q + at, gq_num.to(ty), mask=mask)
        tl.store(grad_rotated_k + gs_stride_role + at, gk_num.to(ty), mask=mask)
    else:
        gq += gq_num
        gk += gk_num
    tl.store(grad_q + at, tl.where(q_raw > 0, gq, 0.0).to(ty), mask=mask)
    tl.store(grad_k + gs_stride_role + at, tl.where(k_raw > 0, gk, 0.0).to(ty), mask=mask)
    tl.store(grad_v + 2 * gs_stride_role + at, gv.to(ty), mask=mask)


@triton.jit
def _rla_bwd_apply_kernel(q, k, v, rotated_q, rotated_k, grad, partial, grad_partial, grad_q, grad_k, grad_v,
                          grad_rotated_q, grad_rotated_k, heads, first_head, n_tokens, per_chunk, chunks, eps,
                          stride_b, stride_h, stride_role, stride_c, stride_n, g_stride_b, g_stride_c, g_stride_n,
                          gs_stride_b, gs_stride_h, gs_stride_role, gs_stride_c, gs_stride_n,
                          D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, ROTATED: tl.constexpr):
    row, chunk, b, h, start, end = _program_span(heads, per_chunk, n_tokens)
    head_at = b * stride_b + h * stride_h
    g_base = grad + b * g_stride_b + (first_head + h) * D * g_stride_c
    gs_head_at = b * gs_stride_b + h * gs_stride_h
    offs_d = tl.arange(0, D_PAD)
    kv, z = _sum_partials(partial, row, chunks, offs_d, D_PAD)
    gkv, gz = _sum_partials(grad_partial, row, chunks, offs_d, D_PAD)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask = (offs_d < D)[:, None] & (offs_n < end)[None, :]
        q_raw = _load_role(q, head_at, 0, offs_d, offs_n, mask, stride_role, stride_c, stride_n).to(tl.float32)
        k_raw = _load_role(k, head_at, 1, offs_d, offs_n, mask, stride_role, stride_c, stride_n).to(tl.float32)
        v_tile = _load_role(v, head_at, 2, offs_d, offs_n, mask, stride_role, stride_c, stride_n).to(tl.float32)
        g = tl.load(g_base + offs_d[:, None] * g_stride_c + offs_n[None, :] * g_stride_n, mask=mask,
                    other=0.0).to(tl.float32)
        q_tile = _relu(q_raw)
        k_tile = _relu(k_raw)
        q_num = q_tile
        k_num = k_tile
        if ROTATED:
            q_num = _load_role(rotated_q, head_at, 0, offs_d, offs_n, mask, stride_role, stride_c,
                               stride_n).to(tl.float32)
            k_num = _load_role(rotated_k, head_at, 1, offs_d, offs_n, mask, stride_role, stride_c,
                               stride_n).to(tl.float32)
        num, den = _output_terms(q_num, q_tile, kv, z, eps, "ieee")
        gnum = g / den[None, :]
        gden = -tl.sum(gnum * num, axis=0) / den
        gq_num = tl.dot(kv, gnum, input_precision="ieee")
        gq = z[:, None] * gden[None, :]
        gk_num = tl.dot(gkv, v_tile, input_precision="ieee")
        gk = tl.zeros_like(gk_num) + gz[:, None]
        gv = tl.dot(tl.trans(gkv), k_num, input_precision="ieee")
        _store_gradients(grad_q, grad_k, grad_v, grad_rotated_q, grad_rotated_k, gs_head_at, offs_d, offs_n, mask,
                         gs_stride_role, gs_stride_c, gs_stride_n, q_raw, k_raw, gq, gq_num, gk, gk_num, gv, ROTATED)


@triton.jit
def _aggregate_role(base, dw_w, dw_b, pw_w, pw_b, head, offs_d, offs_n, valid, height, width, stride_c, stride_n,
                    has_dw_bias, has_pw_bias, role: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                    K: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, WHOLE_ROWS: tl.constexpr = 0):
    """Role ``role`` (0 q, 1 k, 2 v) of one head of the aggregated map at the tokens ``offs_n``, as an fp32
    (D_PAD, BLOCK_N) tile that is zero on padded channels and on tokens outside ``valid``: the depthwise K×K
    conv (zero padding K//2) of the role's D channels of ``base`` (the head's first channel), then the
    role's D×D pointwise matrix. The depthwise result stays in fp32 registers (the unfused path rounds it to the
    input dtype); the pointwise dot rounds its operands only as ``PRECISION`` says. ``WHOLE_ROWS`` (D, not 0): the
    role's channels are one dense run of ``stride_c`` tokens each, all in the tile (:meth:`Heads.whole_rows`), staged
    on chip once, in wide accesses, and every tap gathered from it; otherwise each tap is loaded (a tap shifted by
    one token reads at most 2–4 bytes at a time)."""
    mask_d = offs_d < D
    chan = (head * 3 + role) * D + offs_d  # same channel index in qkv, the weights and the aggregated map
    if WHOLE_ROWS:
        run = _load_run(base + role * D * stride_c, WHOLE_ROWS * stride_c, D_PAD * BLOCK_N)
        at = offs_d[:, None] * stride_c + offs_n[None, :]  # each tile element's place in the run
    else:
        rows = base + (role * D + offs_d)[:, None] * stride_c
    tok_y = offs_n // width
    tok_x = offs_n % width
    local = tl.zeros((D_PAD, BLOCK_N), dtype=tl.float32)
    for t in range(K * K):  # one tap in flight at a time: unrolled, the K² tiles would spill
        dy = t // K - K // 2
        dx = t % K - K // 2
        y = tok_y + dy
        x = tok_x + dx
        inside = valid & (y >= 0) & (y < height) & (x >= 0) & (x < width)  # zero padding: nothing read outside
        if WHOLE_ROWS:
            tap = _gather_tile(run, at + (dy * width + dx), mask_d[:, None] & inside[None, :])
        else:
            tap = tl.load(rows + (offs_n + dy * width + dx)[None, :] * stride_n,
                          mask=mask_d[:, None] & inside[None, :], other=0.0)
        weight = tl.load(dw_w + chan * (K * K) + t, mask=mask_d, other=0.0)
        local += tap.to(tl.float32) * weight.to(tl.float32)[:, None]
    if has_dw_bias != 0:
        local += tl.load(dw_b + chan, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    mix = tl.load(pw_w + chan[:, None] * D + offs_d[None, :], mask=mask_d[:, None] & mask_d[None, :], other=0.0)
    agg = tl.dot(mix.to(tl.float32), local, input_precision=PRECISION)
    if has_pw_bias != 0:
        agg += tl.load(pw_b + chan, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    return tl.where(valid[None, :], agg, 0.0)


@triton.jit
def _aggregated_kv(base, dw_w, dw_b, pw_w, pw_b, head, offs_d, start, end, height, width, has_dw_bias, has_pw_bias,
                   stride_c, stride_n, D: tl.constexpr, D_PAD: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr,
                   PRECISION: tl.constexpr, WHOLE_ROWS: tl.constexpr = 0):
    """kv and z of one head of one scale's aggregated map over tokens [start, end), its k and v computed from
    ``src`` (qkv) tile by tile (``WHOLE_ROWS``: :func:`_aggregate_role`)."""
    kv = tl.zeros((D_PAD, D_PAD), dtype=tl.float32)
    z = tl.zeros((D_PAD,), dtype=tl.float32)
    # No software pipelining: it would stage every neighbour tile in shared memory (over 228 KB for fp32, K = 5).
    for n0 in tl.range(start, end, BLOCK_N, num_stages=1):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid = offs_n < end
        k = _relu(_aggregate_role(base, dw_w, dw_b, pw_w, pw_b, head, offs_d, offs_n, valid, height, width,
                                  stride_c, stride_n, has_dw_bias, has_pw_bias, 1, D, D_PAD, K, BLOCK_N, PRECISION,
                                  WHOLE_ROWS))
        v = _aggregate_role(base, dw_w, dw_b, pw_w, pw_b, head, offs_d, offs_n, valid, height, width,
                            stride_c, stride_n, has_dw_bias, has_pw_bias, 2, D, D_PAD, K, BLOCK_N, PRECISION,
                            WHOLE_ROWS)
        kv, z = _accumulate_kv(k, k, v, kv, z, PRECISION)
    return kv, z


@triton.jit
def _aggregated_apply(base, dw_w, dw_b, pw_w, pw_b, kv, z, eps, out, out_at, head, offs_d, start, end, height,
                      width, has_dw_bias, has_pw_bias, stride_c, stride_n, out_stride_c, out_stride_n, D: tl.constexpr,
                      D_PAD: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                      TOKEN_RUN: tl.constexpr, WHOLE_ROWS: tl.constexpr = 0):
    """Write the output of one head of one scale at tokens [start, end), its q computed from ``src`` (qkv).
    ``TOKEN_RUN``: :func:`common.run_length` of the output's tokens (``src``'s taps are not runs); ``WHOLE_ROWS``:
    :func:`_aggregate_role`, the output's head one dense run too (:func:`_store_whole`)."""
    for n0 in tl.range(start, end, BLOCK_N, num_stages=1):  # not pipelined, as in the reduction
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid = offs_n < end
        q = _relu(_aggregate_role(base, dw_w, dw_b, pw_w, pw_b, head, offs_d, offs_n, valid, height, width,
                                  stride_c, stride_n, has_dw_bias, has_pw_bias, 0, D, D_PAD, K, BLOCK_N, PRECISION,
                                  WHOLE_ROWS))
        mask = _token_mask(offs_d < D, valid, TOKEN_RUN)
        _store_output(q, q, kv, z, eps, out, out_at, offs_d, offs_n, mask, out_stride_c, out_stride_n, "ieee",
                      TOKEN_RUN, WHOLE_ROWS)


@triton.jit
def _rla_agg_fwd_reduce_kernel(src, dw_w, dw_b, pw_w, pw_b, partial, heads, height, width, per_chunk, chunks,
                               has_dw_bias, has_pw_bias, stride_b, stride_c, stride_n,
                               D: tl.constexpr, D_PAD: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr,
                               PRECISION: tl.constexpr):
    """The reduction pass over one scale's aggregated map, computed from ``src`` (qkv): only k and v."""
    row, chunk, b, head, start, end = _program_span(heads, per_chunk, height * width)
    base = src + b * stride_b + head * 3 * D * stride_c
    offs_d = tl.arange(0, D_PAD)
    kv, z = _aggregated_kv(base, dw_w, dw_b, pw_w, pw_b, head, offs_d, start, end, height, width, has_dw_bias,
                           has_pw_bias, stride_c, stride_n, D, D_PAD, K, BLOCK_N, PRECISION)
    _store_partial(partial, row, chunk, chunks, kv, z, offs_d, D_PAD)


@triton.jit
def _rla_agg_fwd_apply_kernel(src, dw_w, dw_b, pw_w, pw_b, partial, out, heads, first_head, height, width,
                              per_chunk, chunks, eps, has_dw_bias, has_pw_bias, stride_b, stride_c, stride_n,
                              out_stride_b, out_stride_c, out_stride_n,
                              D: tl.constexpr, D_PAD: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr,
                              PRECISION: tl.constexpr, TOKEN_RUN: tl.constexpr):
    """The apply pass over one scale's aggregated map, computed from ``src`` (qkv): only q."""
    row, chunk, b, head, start, end = _program_span(heads, per_chunk, height * width)
    base = src + b * stride_b + head * 3 * D * stride_c
    out_at = b * out_stride_b + (first_head + head) * D * out_stride_c
    offs_d = tl.arange(0, D_PAD)
    kv, z = _sum_partials(partial, row, chunks, offs_d, D_PAD)
    _aggregated_apply(base, dw_w, dw_b, pw_w, pw_b, kv, z, eps, out, out_at, head, offs_d, start, end, height, width,
                      has_dw_bias, has_pw_bias, stride_c, stride_n, out_stride_c, out_stride_n, D, D_PAD, K, BLOCK_N,
                      PRECISION, TOKEN_RUN)


@triton.jit
def _rla_agg_fwd_one_pass_kernel(src, dw_w, dw_b, pw_w, pw_b, out, heads, first_head, height, width, eps,
                                 has_dw_bias, has_pw_bias, stride_b, stride_c, stride_n,
                                 out_stride_b, out_stride_c, out_stride_n,
                                 D: tl.constexpr, D_PAD: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr,
                                 PRECISION: tl.constexpr, TOKEN_RUN: tl.constexpr, WHOLE_ROWS: tl.constexpr):
    """Both passes over one scale's aggregated map in one program per (batch, head), where the tokens are not
    split: k and v then q, each computed from ``src`` (qkv), with no partial sums in memory. ``WHOLE_ROWS``: D where
    each role's channels, and the output head's, are one dense run taken whole (:func:`_aggregate_role`), else 0."""
    b = tl.program_id(0) // heads
    head = tl.program_id(0) % heads
    base = src + b * stride_b + head * 3 * D * stride_c
    out_at = b * out_stride_b + (first_head + head) * D * out_stride_c
    offs_d = tl.arange(0, D_PAD)
    kv, z = _aggregated_kv(base, dw_w, dw_b, pw_w, pw_b, head, offs_d, 0, height * width, height, width, has_dw_bias,
                           has_pw_bias, stride_c, stride_n, D, D_PAD, K, BLOCK_N, PRECISION, WHOLE_ROWS)
    _aggregated_apply(base, dw_w, dw_b, pw_w, pw_b, kv, z, eps, out, out_at, head, offs_d, 0, height * width, height,
                      width, has_dw_bias, has_pw_bias, stride_c, stride_n, out_stride_c, out_stride_n, D, D_PAD, K,
                      BLOCK_N, PRECISION, TOKEN_RUN, WHOLE_ROWS)


# --- heads wider than COLUMN_BLOCK ------------------------------------------------------------------------------

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
    q_tile = _relu(_load_role(q, head_at, 0, offs, offs_n, mask, stride_role, stride_c, stride_n)).to(tl.float32)
    q_num = q_tile
    if ROTATED:
        q_num = _load_role(rotated_q, head_at, 0, offs, offs_n, mask, stride_role, stride_c, stride_n).to(tl.float32)
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
            q_k = _relu(_load_role(q, head_at, 0, offs_k, offs_n, (offs_k < D)[:, None] & tokens[None, :],
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
            v_k = _load_role(v, head_at, 2, offs_k, offs_n, mask, stride_role, stride_c, stride_n).to(tl.float32)
            k_num = _relu(_load_role(k, head_at, 1, offs_k, offs_n, mask, stride_role, stride_c, stride_n))
            if ROTATED:
                k_num = _load_role(rotated_k, head_at, 1, offs_k, offs_n, mask, stride_role, stride_c, stride_n)
            gq_num += tl.dot(_block(kv_at, block, kk, offs_w, D_PAD, W), g / den[None, :], input_precision="ieee")
            gk_num += tl.dot(_block(gkv_at, block, kk, offs_w, D_PAD, W), v_k, input_precision="ieee")
            gv += tl.dot(tl.trans(_block(gkv_at, kk, block, offs_w, D_PAD, W)), k_num.to(tl.float32),
                         input_precision="ieee")
        mask_mine = (mine < D)[:, None] & tokens[None, :]
        q_mine = _load_role(q, head_at, 0, mine, offs_n, mask_mine, stride_role, stride_c, stride_n)
        k_mine = _load_role(k, head_at, 1, mine, offs_n, mask_mine, stride_role, stride_c, stride_n)
        gq = z_mine[:, None] * gden[None, :]
        gk = tl.zeros_like(gk_num) + gz_mine[:, None]
        _store_gradients(grad_q, grad_k, grad_v, grad_rotated_q, grad_rotated_k, gs_head_at, mine, offs_n, mask_mine,
                         gs_stride_role, gs_stride_c, gs_stride_n, q_mine, k_mine, gq, gq_num, gk, gk_num, gv, ROTATED)


def _token_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, channel, token) strides of a flattenable (B, C, H, W) tensor."""
    return t.stride(0), t.stride(1), t.stride(3)


class Heads(NamedTuple):
    """Where the kernels find one source's q, k and v: the three tensors (one tensor three times in the
    channel-major layout), the (batch, heads, tokens) they hold, the strides (batch, head, role, channel, token)
    that place element i of head h's role r at token n of batch b, and the rotated q and k of the video
    transformer's form (None otherwise), read with the same strides."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    batch: int
    heads: int
    n_tokens: int
    strides: tuple[int, int, int, int, int]
    rotated_q: torch.Tensor | None = None
    rotated_k: torch.Tensor | None = None

    @property
    def rotated(self) -> bool:
        return self.rotated_q is not None

    def token_run(self, block_n: int, out_strides: tuple[int, ...] = ()) -> int:
        """:func:`common.run_length` of the tokens, in tiles of ``block_n``, of q, k and v (and of the output whose
        (batch, channel, token) strides are ``out_strides``): runs where the tokens are adjacent elements (NCHW
        maps whose token count is no multiple of 16: the JIT proves the others itself, :func:`common.unproven`),
        none where the tokens are not at unit stride (Sana's token-major (B, N, C) q, k, v as its projections leave
        them, channels_last maps)."""
        return common.run_length(block_n, self.n_tokens, (self.strides[4], *out_strides[2:]),
                                 (*self.strides[:4], *out_strides[:2]), True)

    def whole_rows(self, dim: int, out_strides: tuple[int, int, int], shifted_taps: bool = False) -> int:
        """What the one-pass kernels' ``WHOLE_ROWS`` is for this source and an output whose (batch, channel, token)
        strides are ``out_strides``: ``dim`` where each role's ``dim`` channels of every head, and the head's
        channels of the output, are one dense run starting at a multiple of 16 elements, and the tokens fit one tile
        (:func:`_whole_tiles`: 64 tokens, 128 at 16 channels) but are no multiple of 16 (the JIT proves those runs
        itself): an NCHW map of 7×7, or of 9×9 to 11×11 at 16 channels (:func:`_whole_role`). With ``shifted_taps``
        (the aggregated kernel's depthwise taps, which no map's alignment makes runs) a multiple of 16 too (8×8).
        Else 0: other layouts, the rotated form (token-major, never one run), the dtypes and head dims whose build
        spills (:func:`_whole_builds`), and outside :func:`common.on_chip_gathers`."""
        stride_b, stride_h, stride_role, stride_c, stride_n = self.strides
        out_b, out_c, out_n = out_strides
        dense = (stride_c, stride_n, out_c, out_n) == (self.n_tokens, 1, self.n_tokens, 1)
        aligned = all(s % 16 == 0 for s in (stride_b, stride_h, stride_role, out_b, dim * out_c))
        fits = self.n_tokens <= max(_whole_tiles(dim)) and (shifted_taps or self.n_tokens % 16 != 0)
        builds = not self.rotated and _whole_builds(dim, self.q.dtype)
        return dim if dense and aligned and fits and builds and common.on_chip_gathers() else 0

    def rotated_or_stand_ins(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotated q and k, or q and k as never-read stand-ins when there are none."""
        return (self.rotated_q, self.rotated_k) if self.rotated else (self.q, self.k)


def channel_major(src: torch.Tensor, dim: int) -> Heads:
    """LiteMLA's flattenable (B, 3·heads·dim, H, W) map, channels interleaved per head (q, k, v blocks)."""
    batch, channels, height, width = src.shape
    stride_b, stride_c, stride_n = _token_strides(src)
    return Heads(src, src, src, batch, channels // (3 * dim), height * width,
                 (stride_b, 3 * dim * stride_c, dim * stride_c, stride_c, stride_n))


def token_major(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dim: int, rotated_q: torch.Tensor | None = None,
                rotated_k: torch.Tensor | None = None) -> Heads:
    """Sana's (B, N, heads·dim) q, k and v (and the video form's rotated q and k), as the projections leave them,
    all read with q's strides."""
    batch, n_tokens, channels = q.shape
    stride_b, stride_n, stride_c = q.stride()
    return Heads(q, k, v, batch, channels // dim, n_tokens, (stride_b, dim * stride_c, 0, stride_c, stride_n),
                 rotated_q, rotated_k)


def token_major_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, channel, token) strides of a (B, N, C) output or gradient."""
    return t.stride(0), t.stride(2), t.stride(1)


def _empty_partials(src: Heads, dim: int, chunks: int) -> torch.Tensor:
    """Scratch for the per-chunk fp32 partial sums of kv and z of every (batch, head) of one source."""
    d_pad = dot_size(dim)
    return torch.empty(src.batch * src.heads, chunks, d_pad * d_pad + d_pad, device=src.q.device,
                       dtype=torch.float32)


def _partials(src: Heads, dim: int, per_chunk: int, chunks: int) -> torch.Tensor:
    """Per-chunk fp32 partial sums of kv and z for every (batch, head) of one source."""
    partial = _empty_partials(src, dim, chunks)
    _rla_fwd_reduce_kernel[(partial.shape[0], chunks)](
        src.k, src.v, src.rotated_or_stand_ins()[1], partial, src.heads, src.n_tokens, per_chunk, chunks,
        *src.strides, D=dim, D_PAD=dot_size(dim), BLOCK_N=BLOCK_N, **dot_mode(src.q.dtype, "matmul"),
        ROTATED=src.rotated, TOKEN_RUN=src.token_run(BLOCK_N))
    return partial


def _empty_output(qkv: torch.Tensor, dim: int, groups: int) -> torch.Tensor:
    """(B, groups·heads·dim, H, W), contiguous, in ``qkv``'s dtype."""
    batch, channels, height, width = qkv.shape
    return torch.empty(batch, channels // 3 * groups, height, width, device=qkv.device, dtype=qkv.dtype)


def attend(src: Heads, out: torch.Tensor, out_strides: tuple[int, int, int], index: int, dim: int,
           eps: float) -> None:
    """Write the attention over source ``src`` into head group ``index`` of ``out`` (whose (batch, channel, token)
    strides are ``out_strides``)."""
    if dim in WIDE_HEAD_DIMS:
        return _attend_wide(src, out, out_strides, index, dim, eps)
    per_chunk, chunks = _chunking(src.n_tokens, src.batch * src.heads)
    rotated_q, rotated_k = src.rotated_or_stand_ins()
    block = _apply_block(dot_size(dim))
    if chunks == 1:
        whole_rows = src.whole_rows(dim, out_strides)
        if whole_rows:
            block = _whole_tile(src.n_tokens)
        _rla_fwd_one_pass_kernel[(src.batch * src.heads,)](
            src.q, src.k, src.v, rotated_q, rotated_k, out, src.heads, index * src.heads, src.n_tokens, eps,
            *src.strides, *out_strides, D=dim, D_PAD=dot_size(dim), BLOCK_N=block, **dot_mode(src.q.dtype, "matmul"),
            ROTATED=src.rotated, TOKEN_RUN=1 if whole_rows else src.token_run(block, out_strides),
            WHOLE_ROWS=whole_rows, **({"num_warps": _whole_warps(dim, block)} if whole_rows else {}))
        return
    partial = _partials(src, dim, per_chunk, chunks)
    _rla_fwd_apply_kernel[(src.batch * src.heads, chunks)](
        src.q, rotated_q, partial, out, src.heads, index * src.heads, src.n_tokens, per_chunk, chunks, eps,
        *src.strides, *out_strides, D=dim, D_PAD=dot_size(dim), BLOCK_N=block, ROTATED=src.rotated,
        TOKEN_RUN=src.token_run(block, out_strides))


def forward(sources: list[torch.Tensor], dim: int, eps: float) -> torch.Tensor:
    """Output (B, Σ heads·dim, H, W), contiguous, in the sources' dtype."""
    out = _empty_output(sources[0], dim, len(sources))
    for index, src in enumerate(sources):
        attend(channel_major(src, dim), out, _token_strides(out), index, dim, eps)
    return out


WHOLE_HEAD_DIMS = (8, 16, 32)
"""The head dims whose d×d matrices one program of this module's kernels holds whole (every released model's;
CI compiles each for sm_90). The only ones of the aggregated-source kernels."""
WIDE_HEAD_DIMS = (64, 112)
"""Wider head dims, which the ``_wide_*`` kernels take (and CI compiles): Sana-Video's 112, and 64."""
HEAD_DIMS = WHOLE_HEAD_DIMS + WIDE_HEAD_DIMS
"""The head dims of a stored source."""
AGGREGATION_KERNEL_SIZES = (3, 5)


def _aggregated_one_pass_block(dim: int, dtype: torch.dtype) -> int | None:
    """Token tile of the aggregated one-pass kernel, or None where it is not built. fp16/bf16 heads up to 16
    channels take the reduction's 64 tokens; at 32 channels half the reduction's tile, 16 tokens (the kernel holds kv
    through its q tiles too: with 32 its build reaches 255 registers on sm_90). fp32 inputs keep the two passes: at
    32 channels every tile a ``tl.dot`` takes spills, and the narrower heads' spill-free tiles differ between
    triton 3.6 and 3.8 (32 tokens spill under 3.6 at 16 channels, 64 under 3.8 at 8)."""
    if dtype == torch.float32:
        return None
    d_pad = dot_size(dim)
    return _heavy_block(d_pad, dtype) if d_pad <= 16 else _heavy_block(d_pad, dtype) // 2


def _aggregated_constexprs(dim: int, dtype: torch.dtype, kernel_size: int, one_pass: bool = False) -> dict:
    """Compile-time parameters of the aggregated-source kernels (the one-pass kernel's where ``one_pass``). They
    multiply fp32 tiles (the depthwise result is never rounded to the input dtype): in IEEE precision for fp32
    inputs, on TF32 tensor cores for fp16 and bf16 ones, whose 10-bit mantissa holds at least the input's
    precision."""
    d_pad = dot_size(dim)
    return dict(D=dim, D_PAD=d_pad, K=kernel_size,
                BLOCK_N=_aggregated_one_pass_block(dim, dtype) if one_pass else _heavy_block(d_pad, dtype),
                PRECISION="ieee" if dtype == torch.float32 else "tf32")


def forward_aggregated(qkv: torch.Tensor, scales: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor,
                                                           torch.Tensor | None]],
                       dim: int, eps: float) -> torch.Tensor:
    """The output of :func:`forward` over ``qkv`` and its aggregated maps, each aggregated map computed on the
    fly from ``qkv``, one token tile at a time, and never written. ``scales`` holds (depthwise weight
    (C, 1, k, k), its bias or None, pointwise weight (C, dim, 1, 1), its bias or None) per scale, k in
    :data:`AGGREGATION_KERNEL_SIZES`."""
    batch, channels, height, width = qkv.shape
    heads = channels // (3 * dim)
    out = _empty_output(qkv, dim, 1 + len(scales))
    out_strides = _token_strides(out)
    attend(channel_major(qkv, dim), out, out_strides, 0, dim, eps)

    def out_run(block_n: int) -> int:  # the aggregated maps' taps are no runs: only the output's tokens
        return common.run_length(block_n, height * width, out_strides[2:], out_strides[:2], True)

    per_chunk, chunks = _chunking(height * width, batch * heads)
    grid = (batch * heads, chunks)
    for index, (dw_w, dw_b, pw_w, pw_b) in enumerate(scales, start=1):
        flags = (int(dw_b is not None), int(pw_b is not None))
        # The weights are tiny: made contiguous (a no-op for parameters) so the kernels index them densely;
        # an absent bias passes its weight as a never-read pointer.
        dw_w, pw_w = dw_w.contiguous(), pw_w.contiguous()
        weights = (dw_w, dw_w if dw_b is None else dw_b.contiguous(), pw_w, pw_w if pw_b is None else pw_b.contiguous())
        if chunks == 1 and _aggregated_one_pass_block(dim, qkv.dtype):
            constexprs = _aggregated_constexprs(dim, qkv.dtype, dw_w.shape[-1], one_pass=True)
            whole, options = 0, {}
            if dot_size(dim) <= 16:  # wider heads take 16-token tiles (_aggregated_one_pass_block)
                whole = channel_major(qkv, dim).whole_rows(dim, out_strides, shifted_taps=True)
            if whole:
                constexprs["BLOCK_N"] = _whole_tile(height * width)
                options = {"num_warps": _whole_warps(dim, constexprs["BLOCK_N"])}
            _rla_agg_fwd_one_pass_kernel[(batch * heads,)](
                qkv, *weights, out, heads, index * heads, height, width, eps, *flags, *_token_strides(qkv),
                *out_strides, **constexprs, TOKEN_RUN=1 if whole else out_run(constexprs["BLOCK_N"]),
                WHOLE_ROWS=whole, **options)
            continue
        constexprs = _aggregated_constexprs(dim, qkv.dtype, dw_w.shape[-1])
        partial = _empty_partials(channel_major(qkv, dim), dim, chunks)
        _rla_agg_fwd_reduce_kernel[grid](qkv, *weights, partial, heads, height, width, per_chunk, chunks, *flags,
                                         *_token_strides(qkv), **constexprs)
        _rla_agg_fwd_apply_kernel[grid](qkv, *weights, partial, out, heads, index * heads, height, width,
                                        per_chunk, chunks, eps, *flags, *_token_strides(qkv), *out_strides,
                                        **constexprs, TOKEN_RUN=out_run(constexprs["BLOCK_N"]))
    return out


def backward(sources: list[torch.Tensor], grad_out: torch.Tensor, dim: int, eps: float) -> list[torch.Tensor]:
    """Gradients of every source tensor, each shaped and laid out like its source. kv and z are recomputed
    (one more read of k and v) rather than saved, so training keeps no state between the passes."""
    if not flattenable(grad_out):  # e.g. the stride-0 gradient of y.sum()
        grad_out = grad_out.contiguous()
    grads = []
    for index, src in enumerate(sources):
        grad_src = torch.empty_like(src)
        backward_into(channel_major(src, dim), grad_out, _token_strides(grad_out), channel_major(grad_src, dim),
                      index, dim, eps)
        grads.append(grad_src)
    return grads


def backward_into(src: Heads, grad_out: torch.Tensor, g_strides: tuple[int, int, int], grads: Heads, index: int,
                  dim: int, eps: float) -> None:
    """Write the gradients of source ``src``'s q, k and v (and rotated q and k) (head group ``index`` of
    ``grad_out``, whose (batch, channel, token) strides are ``g_strides``) into the tensors of ``grads``."""
    if dim in WIDE_HEAD_DIMS:
        return _backward_wide(src, grad_out, g_strides, grads, index, dim, eps)
    d_pad = dot_size(dim)
    per_chunk, chunks = _chunking(src.n_tokens, src.batch * src.heads)
    block = _heavy_block(d_pad, src.q.dtype, src.rotated)
    partial = _partials(src, dim, per_chunk, chunks)
    grad_partial = torch.empty_like(partial)
    grid = (src.batch * src.heads, chunks)
    constexprs = dict(D=dim, D_PAD=d_pad, BLOCK_N=block, ROTATED=src.rotated)
    rotated_q, rotated_k = src.rotated_or_stand_ins()
    _rla_bwd_reduce_kernel[grid](src.q, rotated_q, grad_out, partial, grad_partial, src.heads, index * src.heads,
                                 src.n_tokens, per_chunk, chunks, eps, *src.strides, *g_strides, **constexprs)
    _rla_bwd_apply_kernel[grid](src.q, src.k, src.v, rotated_q, rotated_k, grad_out, partial, grad_partial,
                                grads.q, grads.k, grads.v, *grads.rotated_or_stand_ins(), src.heads,
                                index * src.heads, src.n_tokens, per_chunk, chunks, eps, *src.strides, *g_strides,
                                *grads.strides, **constexprs)


_WIDE_OPTIONS = {
    "_wide_fwd_reduce_kernel": {"num_warps": 8},
    "_wide_fwd_apply_kernel": {"num_warps": 4},
    "_wide_bwd_reduce_kernel": {"num_warps": 4, "num_stages": 1},
    "_wide_bwd_apply_kernel": {"num_warps": 8},
}
"""Launch options that keep each kernel's sm_90 build spill-free at d = 64 and 112 in every dtype, with and
without the rotated tiles (found by compiling the alternatives; registers near 255 either way)."""


def _shape_constexprs(dim: int) -> dict:
    return dict(D=dim, D_PAD=dot_size(dim), W=COLUMN_BLOCK)


def _wide_partials(src: Heads, dim: int, chunks: int) -> torch.Tensor:
    """Scratch for per-chunk fp32 partial sums: (batch·heads, chunks, column blocks, slot)."""
    return torch.empty(src.batch * src.heads, chunks, _column_blocks(dim), _slot_size(dot_size(dim)),
                       device=src.q.device, dtype=torch.float32)


def _summed_kv(src: Heads, dim: int, per_chunk: int, chunks: int) -> torch.Tensor:
    """kv's block columns and z of every (batch, head), summed over the chunks: (batch·heads, column blocks,
    slot) fp32."""
    partial = _wide_partials(src, dim, chunks)
    _wide_fwd_reduce_kernel[(partial.shape[0], chunks, _column_blocks(dim))](
        src.k, src.v, src.rotated_or_stand_ins()[1], partial, src.heads, src.n_tokens, per_chunk, chunks,
        *src.strides, BLOCK_N=_REDUCE_BLOCK_N, **_shape_constexprs(dim), **dot_mode(src.q.dtype, "matmul"),
        ROTATED=src.rotated, **_WIDE_OPTIONS["_wide_fwd_reduce_kernel"])
    return partial.sum(dim=1)


def _attend_wide(src: Heads, out: torch.Tensor, out_strides: tuple[int, int, int], index: int, dim: int,
                 eps: float) -> None:
    """:func:`attend` for a head dim in ``WIDE_HEAD_DIMS``."""
    rows, blocks = src.batch * src.heads, _column_blocks(dim)
    per_chunk, chunks = _chunking(src.n_tokens, rows * blocks)
    summed = _summed_kv(src, dim, per_chunk, chunks)
    _wide_fwd_apply_kernel[(rows, chunks, blocks)](
        src.q, src.rotated_or_stand_ins()[0], summed, out, src.heads, index * src.heads, src.n_tokens, per_chunk,
        eps, *src.strides, *out_strides, BLOCK_N=_APPLY_BLOCK_N, **_shape_constexprs(dim), ROTATED=src.rotated,
        **_WIDE_OPTIONS["_wide_fwd_apply_kernel"])


def _backward_wide(src: Heads, grad_out: torch.Tensor, g_strides: tuple[int, int, int], grads: Heads, index: int,
                   dim: int, eps: float) -> None:
    """:func:`backward_into` for a head dim in ``WIDE_HEAD_DIMS``."""
    rows, blocks = src.batch * src.heads, _column_blocks(dim)
    per_chunk, chunks = _chunking(src.n_tokens, rows * blocks)
    summed = _summed_kv(src, dim, per_chunk, chunks)
    grad_partial = _wide_partials(src, dim, chunks)
    token_partial = torch.empty(rows, blocks, src.n_tokens, device=src.q.device, dtype=torch.float32)
    constexprs = dict(BLOCK_N=_BACKWARD_BLOCK_N, **_shape_constexprs(dim), ROTATED=src.rotated)
    rotated_q, rotated_k = src.rotated_or_stand_ins()
    _wide_bwd_reduce_kernel[(rows, chunks, blocks)](
        src.q, rotated_q, grad_out, summed, grad_partial, token_partial, src.heads, index * src.heads, src.n_tokens,
        per_chunk, chunks, eps, *src.strides, *g_strides, **constexprs, **_WIDE_OPTIONS["_wide_bwd_reduce_kernel"])
    _wide_bwd_apply_kernel[(rows, chunks, blocks)](
        src.q, src.k, src.v, rotated_k, grad_out, summed, grad_partial.sum(dim=1), token_partial, grads.q, grads.k,
        grads.v, *grads.rotated_or_stand_ins(), src.heads, index * src.heads, src.n_tokens, per_chunk, eps,
        *src.strides, *g_strides, *grads.strides, **constexprs, **_WIDE_OPTIONS["_wide_bwd_apply_kernel"])


def _wide_compile_configs():
    """The (kernel, signature, constexprs, options) of the wide-head launchers."""
    pointers = ("q", "k", "v", "rotated_q", "rotated_k", "out", "grad", "grad_q", "grad_k", "grad_v",
                "grad_rotated_q", "grad_rotated_k")
    for dtype, ptr in POINTER_TYPES.items():
        for dim in WIDE_HEAD_DIMS:
            for rotated in (False, True):
                shape = {**_shape_constexprs(dim), "ROTATED": rotated}
                backward = {**shape, "BLOCK_N": _BACKWARD_BLOCK_N}
                reduces = [(_wide_fwd_reduce_kernel, {**shape, "BLOCK_N": _REDUCE_BLOCK_N, **mode})
                           for mode in compiled_dot_modes(dtype)]
                for kernel, constexprs in (*reduces, (_wide_fwd_apply_kernel, {**shape, "BLOCK_N": _APPLY_BLOCK_N}),
                                           (_wide_bwd_reduce_kernel, backward), (_wide_bwd_apply_kernel, backward)):
                    # Partial sums are fp32 scratch, eps an fp32 scalar.
                    special = {name: "*fp32" for name in kernel.arg_names
                               if "partial" in name or "summed" in name} | {"eps": "fp32"}
                    yield (kernel, signature(kernel, ptr, constexprs, pointers, special), constexprs,
                           _WIDE_OPTIONS[kernel.__name__])


def _with_token_runs(kernel, constexprs: dict):
    """``constexprs`` with each ``TOKEN_RUN`` its token tile allows and the JIT does not prove itself, for the kernels
    that take one."""
    if "TOKEN_RUN" not in kernel.arg_names or constexprs.get("WHOLE_ROWS"):
        yield constexprs
        return
    runs = (run for run in common.RUNS if constexprs["BLOCK_N"] % run == 0 and common.unproven(run, True) > 1)
    for run in (1, *runs):
        yield {**constexprs, "TOKEN_RUN": run}


def compile_configs():
    """Every (kernel, signature, constexprs[, options]) the launchers above can request: CI compiles each one ahead of
    time for sm_90, so an error only the GPU compiler would raise fails there instead of on a user's GPU."""
    pointers = ("q", "k", "v", "rotated_q", "rotated_k", "src", "out", "grad", "grad_q", "grad_k", "grad_v",
                "grad_rotated_q", "grad_rotated_k", "dw_w", "dw_b", "pw_w", "pw_b")
    for dtype, ptr in POINTER_TYPES.items():
        for dim in WHOLE_HEAD_DIMS:
            plain = {"D": dim, "D_PAD": dot_size(dim), "BLOCK_N": BLOCK_N}
            configs = []
            for rotated in (False, True):
                backward = {**plain, "BLOCK_N": _heavy_block(plain["D_PAD"], dtype, rotated), "ROTATED": rotated}
                apply = {**plain, "BLOCK_N": _apply_block(plain["D_PAD"]), "ROTATED": rotated}
                for mode in compiled_dot_modes(dtype):
                    configs += [(_rla_fwd_reduce_kernel, {**plain, **mode, "ROTATED": rotated}),
                                (_rla_fwd_one_pass_kernel, {**apply, **mode, "WHOLE_ROWS": 0})]
                    if not rotated and _whole_builds(dim, dtype):
                        whole = {"ROTATED": False, "TOKEN_RUN": 1, "WHOLE_ROWS": dim}
                        configs += [(_rla_fwd_one_pass_kernel, {**plain, **mode, **whole, "BLOCK_N": tile})
                                    for tile in _whole_tiles(dim)]
                configs += [(_rla_fwd_apply_kernel, apply), (_rla_bwd_reduce_kernel, backward),
                            (_rla_bwd_apply_kernel, backward)]
            for k in AGGREGATION_KERNEL_SIZES:
                configs += [(kernel, _aggregated_constexprs(dim, dtype, k))
                            for kernel in (_rla_agg_fwd_reduce_kernel, _rla_agg_fwd_apply_kernel)]
                one_pass = _aggregated_constexprs(dim, dtype, k, one_pass=True) if _aggregated_one_pass_block(
                    dim, dtype) else None
                if one_pass:
                    configs.append((_rla_agg_fwd_one_pass_kernel, {**one_pass, "WHOLE_ROWS": 0}))
                if one_pass and dot_size(dim) <= 16:
                    configs += [(_rla_agg_fwd_one_pass_kernel,
                                 {**one_pass, "BLOCK_N": tile, "TOKEN_RUN": 1, "WHOLE_ROWS": dim})
                                for tile in _whole_tiles(dim)]
            for kernel, base in configs:
                # Partial sums are fp32 scratch, eps an fp32 scalar.
                special = {name: "*fp32" for name in kernel.arg_names if "partial" in name} | {"eps": "fp32"}
                for constexprs in _with_token_runs(kernel, base):
                    options = ({"num_warps": _whole_warps(dim, constexprs["BLOCK_N"])} if constexprs.get("WHOLE_ROWS")
                               else {})
                    yield kernel, signature(kernel, ptr, constexprs, pointers, special), constexprs, options
    yield from _wide_compile_configs()
