"""Triton kernels of the attention core of MSRA EfficientViT's cascaded group attention, forward and backward.

One call handles one head over a batch of windows; one program handles one window. Per window, with q, k
(kd, N), v (vd, N), N = R² tokens of an R×R window (row-major in memory) and the head's (R²,) bias row:

    S = scale·qᵀk + B,  B[i, j] = bias_row[|y_i − y_j|·R + |x_i − x_j|],  P = softmax_j(S),  out = v·Pᵀ

N is at most 64, so the whole N×N score matrix stays in registers. Tokens are laid out on a padded
R_PAD×R_PAD grid (tile position y·R_PAD + x, R_PAD = 4 or 8), so the tile is 16 or 64 wide and the token
coordinates are bit fields of the tile position; positions outside the R×R window are masked (padded keys get
−inf). The bias is gathered from the row inside the kernel. Channels are walked in chunks of ``BLOCK_D`` (every
released key and value dim, 16 to 112, is a multiple of 16), so one compiled kernel serves every head width.
q, k, v and the incoming gradient are read in place with any strides (k and v are usually views into the qkv
conv's output; y.sum()'s gradient has stride 0); outputs are written once, contiguous, in the input dtype. The
softmax is computed in fp32.

Backward (g = ∂L/∂out), recomputing P rather than saving it (two small dots): dv = g·P, dP = gᵀ·v,
dS = P∘(dP − rowsum(dP∘P)), dq = scale·k·dSᵀ, dk = scale·q·dS. The bias row's gradient is Σ over windows of dS
scattered by the index. Each program bins its window's dS into the R² offsets itself, deterministically, with
two products with exact one-hot matrices (on the grid layout the index splits into |Δy| and |Δx|) and writes R²
fp32 values; the launcher sums those over windows with a torch reduction. No atomics: repeated runs give
identical gradients.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from evit_kernels.dispatch import span
from evit_kernels.triton._common import (
    POINTER_TYPES,
    cdiv,
    compiled_dot_modes,
    dot_mode,
    dot_size,
    mma,
    next_power_of_2,
    rounded,
    signature,
)

BLOCK_D = 16  # channel chunk: tl.dot's minimum size; released key/value dims are multiples of it
MAX_RESOLUTION = 8  # N = R² ≤ 64: the N×N fp32 tiles of the backward stay in registers on sm_90
_BINS = 16  # |Δy| and |Δx| take values < R_PAD ≤ 8; padded to tl.dot's minimum


def grid_side(resolution: int) -> int:
    """R_PAD: the side of the padded token grid, a power of two with R_PAD² ≥ 16 (tl.dot's minimum)."""
    return max(4, next_power_of_2(resolution))


def _backward_warps(r_pad: int) -> int:
    """8 warps for the backward of 64-token windows: its N×N fp32 tiles (P, dP, dS) spill the registers of 4 (fp32
    under triton 3.6); smaller windows keep 4."""
    return 8 if r_pad > 4 else 4


@triton.jit
def _tokens(resolution, R_PAD: tl.constexpr):
    """Per tile position: the token's row y, column x, memory index y·R + x, and whether it is in the window."""
    pos = tl.arange(0, R_PAD * R_PAD)
    y = pos // R_PAD
    x = pos % R_PAD
    return y, x, y * resolution + x, (y < resolution) & (x < resolution)


@triton.jit
def _load(base, c0, n_channels, offs_c, index, valid, stride_c, stride_n):
    """The (BLOCK_D, N_PAD) tile of channels [c0, c0 + BLOCK_D) × tokens, zero outside the tensor."""
    rows = c0 + offs_c
    mask = (rows < n_channels)[:, None] & valid[None, :]
    return tl.load(base + rows[:, None] * stride_c + index[None, :] * stride_n, mask=mask, other=0.0)


@triton.jit
def _load_t(base, c0, n_channels, offs_c, index, valid, stride_c, stride_n):
    """The same tile transposed, (N_PAD, BLOCK_D), read in that order (no register transpose of big tiles)."""
    rows = c0 + offs_c
    mask = valid[:, None] & (rows < n_channels)[None, :]
    return tl.load(base + index[:, None] * stride_n + rows[None, :] * stride_c, mask=mask, other=0.0)


@triton.jit
def _store(base, c0, n_channels, n_tokens, offs_c, index, valid, tile):
    """Store a (BLOCK_D, N_PAD) tile into a contiguous (channels, tokens) block."""
    rows = c0 + offs_c
    mask = (rows < n_channels)[:, None] & valid[None, :]
    tl.store(base + rows[:, None] * n_tokens + index[None, :], tile.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _store_t(base, c0, n_channels, n_tokens, offs_c, index, valid, tile_t):
    """Store a transposed (N_PAD, BLOCK_D) tile into a contiguous (channels, tokens) block."""
    rows = c0 + offs_c
    mask = valid[:, None] & (rows < n_channels)[None, :]
    tl.store(base + rows[None, :] * n_tokens + index[:, None], tile_t.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _probabilities(q_base, k_base, bias_row, bias_stride, scale, key_dim, resolution, offs_c, y, x, index, valid,
                   q_sc, q_sn, k_sc, k_sn, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
                   PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """P = softmax over keys of scale·qᵀk + bias, (N_PAD queries, N_PAD keys) in fp32. Padded queries get a
    zero bias (finite rows, never stored), padded keys −inf (zero probability)."""
    scores = tl.zeros((N_PAD, N_PAD), dtype=tl.float32)
    for c0 in range(0, key_dim, BLOCK_D):
        q_t = _load_t(q_base, c0, key_dim, offs_c, index, valid, q_sc, q_sn)
        k = _load(k_base, c0, key_dim, offs_c, index, valid, k_sc, k_sn)
        scores = mma(q_t, k, scores, PRECISION=PRECISION, UPCAST=UPCAST)
    return _softmax(scores, bias_row, bias_stride, scale, resolution, y, x, valid)


@triton.jit
def _softmax(scores, bias_row, bias_stride, scale, resolution, y, x, valid, KEYS_AXIS: tl.constexpr = 1):
    """softmax over keys of scale·scores + bias for the (N_PAD, N_PAD) fp32 qᵀk of one window (queries × keys;
    ``KEYS_AXIS`` 0: its transpose kᵀq, keys × queries; the bias is symmetric)."""
    offset = tl.abs(y[:, None] - y[None, :]) * resolution + tl.abs(x[:, None] - x[None, :])
    bias = tl.load(bias_row + offset * bias_stride, mask=valid[:, None] & valid[None, :], other=0.0)
    if KEYS_AXIS == 1:
        keys = valid[None, :]
    else:
        keys = valid[:, None]
    scores = tl.where(keys, scores * scale + bias.to(tl.float32), float("-inf"))
    if KEYS_AXIS == 1:
        exp = tl.exp(scores - tl.max(scores, axis=1)[:, None])
        return exp / tl.sum(exp, axis=1)[:, None]
    exp = tl.exp(scores - tl.max(scores, axis=0)[None, :])
    return exp / tl.sum(exp, axis=0)[None, :]


@triton.jit
def _bias_bins(grad_s, R_PAD: tl.constexpr, BINS: tl.constexpr):
    """(BINS, BINS) fp32: entry (a, b) sums grad_s over the query/key pairs with |Δy| = a and |Δx| = b.

    Reordering grad_s[(y_i, x_i), (y_j, x_j)] to m[(y_i, y_j), (x_i, x_j)] makes the binning two products with
    exact one-hot matrices (IEEE fp32, so no rounding beyond the sums themselves)."""
    N_PAD: tl.constexpr = R_PAD * R_PAD
    m = tl.reshape(tl.permute(tl.reshape(grad_s, (R_PAD, R_PAD, R_PAD, R_PAD)), (0, 2, 1, 3)), (N_PAD, N_PAD))
    pos = tl.arange(0, N_PAD)
    distance = tl.abs(pos // R_PAD - pos % R_PAD)
    bins = tl.arange(0, BINS)
    by_dx = tl.dot(m, (distance[:, None] == bins[None, :]).to(tl.float32), input_precision="ieee")
    return tl.dot((bins[:, None] == distance[None, :]).to(tl.float32), by_dx, input_precision="ieee")


@triton.jit
def _cga_fwd_kernel(q, k, v, bias_row, out, n_tokens, resolution, key_dim, val_dim, scale,
                    q_sb, q_sc, q_sn, k_sb, k_sc, k_sn, v_sb, v_sc, v_sn, bias_stride,
                    R_PAD: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    w = tl.program_id(0)
    offs_c = tl.arange(0, BLOCK_D)
    y, x, index, valid = _tokens(resolution, R_PAD)
    p = _probabilities(q + w * q_sb, k + w * k_sb, bias_row, bias_stride, scale, key_dim, resolution, offs_c,
                       y, x, index, valid, q_sc, q_sn, k_sc, k_sn, R_PAD * R_PAD, BLOCK_D, PRECISION=PRECISION,
                       UPCAST=UPCAST)
    for c0 in range(0, val_dim, BLOCK_D):
        v_t = _load_t(v + w * v_sb, c0, val_dim, offs_c, index, valid, v_sc, v_sn)
        out_t = mma(p, v_t, None, PRECISION=PRECISION, UPCAST=UPCAST)  # out[c, i] = Σ_j P[i, j] v[c, j]
        _store_t(out + w * val_dim * n_tokens, c0, val_dim, n_tokens, offs_c, index, valid, out_t)


@triton.jit
def _cga_bwd_kernel(q, k, v, bias_row, grad, grad_q, grad_k, grad_v, bias_partial, n_tokens, resolution, key_dim,
                    val_dim, scale, q_sb, q_sc, q_sn, k_sb, k_sc, k_sn, v_sb, v_sc, v_sn, g_sb, g_sc, g_sn,
                    bias_stride, R_PAD: tl.constexpr, BLOCK_D: tl.constexpr, BINS: tl.constexpr,
                    PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    w = tl.program_id(0)
    offs_c = tl.arange(0, BLOCK_D)
    y, x, index, valid = _tokens(resolution, R_PAD)
    q_base, k_base = q + w * q_sb, k + w * k_sb
    p = _probabilities(q_base, k_base, bias_row, bias_stride, scale, key_dim, resolution, offs_c,
                       y, x, index, valid, q_sc, q_sn, k_sc, k_sn, R_PAD * R_PAD, BLOCK_D, PRECISION=PRECISION,
                       UPCAST=UPCAST)
    grad_p = tl.zeros((R_PAD * R_PAD, R_PAD * R_PAD), dtype=tl.float32)
    for c0 in range(0, val_dim, BLOCK_D):
        g_t = _load_t(grad + w * g_sb, c0, val_dim, offs_c, index, valid, g_sc, g_sn)
        v_tile = _load(v + w * v_sb, c0, val_dim, offs_c, index, valid, v_sc, v_sn)
        grad_p = mma(g_t, v_tile, grad_p, PRECISION=PRECISION, UPCAST=UPCAST)  # dP[i, j] = Σ_c g[c, i] v[c, j]
        # dv[c, j] = Σ_i g[c, i] P[i, j]
        gv = mma(tl.trans(g_t), p, None, PRECISION=PRECISION, UPCAST=UPCAST)
        _store(grad_v + w * val_dim * n_tokens, c0, val_dim, n_tokens, offs_c, index, valid, gv)
    # Padded queries have g = 0 and padded keys P = 0, so grad_s is 0 outside the window's N×N block.
    grad_s = p * (grad_p - tl.sum(grad_p * p, axis=1)[:, None])
    # dq and dk in separate passes: one pass needing grad_s as both dot operands spills registers in fp32.
    for c0 in range(0, key_dim, BLOCK_D):
        k_t = _load_t(k_base, c0, key_dim, offs_c, index, valid, k_sc, k_sn)
        # dq[c, i] = Σ_j dS[i, j] k[c, j]
        gq_t = mma(grad_s, k_t, None, PRECISION=PRECISION, UPCAST=UPCAST) * scale
        _store_t(grad_q + w * key_dim * n_tokens, c0, key_dim, n_tokens, offs_c, index, valid, gq_t)
    for c0 in range(0, key_dim, BLOCK_D):
        q_tile = _load(q_base, c0, key_dim, offs_c, index, valid, q_sc, q_sn)
        # dk[c, j] = Σ_i q[c, i] dS[i, j]
        gk = mma(q_tile, grad_s, None, PRECISION=PRECISION, UPCAST=UPCAST) * scale
        _store(grad_k + w * key_dim * n_tokens, c0, key_dim, n_tokens, offs_c, index, valid, gk)
    bins = _bias_bins(grad_s, R_PAD, BINS)
    dy = tl.arange(0, BINS)
    in_window = (dy < resolution)[:, None] & (dy < resolution)[None, :]
    tl.store(bias_partial + w * n_tokens + dy[:, None] * resolution + dy[None, :], bins, mask=in_window)


@triton.jit
def _project(weight, bias, row0, n_rows, offs_r, feat, offs_c, n_channels, PRECISION: tl.constexpr,
             UPCAST: tl.constexpr):
    """Rows [row0, row0 + n_rows) of a head's qkv conv (weight (rows, C/h) contiguous, bias (rows,)) applied to
    ``feat`` (C_PAD channels, N_PAD tokens) on chip: (R_PAD rows, N_PAD) fp32, zero in the padded rows."""
    mask_r = offs_r < n_rows
    w = tl.load(weight + (row0 + offs_r)[:, None] * n_channels + offs_c[None, :],
                mask=mask_r[:, None] & (offs_c < n_channels)[None, :], other=0.0)
    out = mma(w, feat, None, PRECISION=PRECISION, UPCAST=UPCAST)
    return out + tl.load(bias + row0 + offs_r, mask=mask_r, other=0.0).to(tl.float32)[:, None]


@triton.jit
def _window_depthwise(q_scratch, weight, bias, ksize, key_dim, resolution, offs_k, y, x, valid,
                      R_PAD: tl.constexpr, KD_PAD: tl.constexpr):
    """The depthwise k×k conv of q within the window (zero outside it, as the original pads each window), q read
    back from this program's scratch tile (KD_PAD channels × grid positions); weight (kd, k, k) contiguous.
    (KD_PAD, N_PAD) fp32."""
    mask_k = offs_k < key_dim
    pad = ksize // 2
    acc = tl.zeros((KD_PAD, R_PAD * R_PAD), dtype=tl.float32)
    for kh in range(0, ksize):
        for kw in range(0, ksize):
            ty = y + kh - pad
            tx = x + kw - pad
            inside = valid & (ty >= 0) & (ty < resolution) & (tx >= 0) & (tx < resolution)
            q = tl.load(q_scratch + offs_k[:, None] * (R_PAD * R_PAD) + (ty * R_PAD + tx)[None, :],
                        mask=mask_k[:, None] & inside[None, :], other=0.0)
            w = tl.load(weight + offs_k * ksize * ksize + kh * ksize + kw, mask=mask_k, other=0.0)
            acc += q.to(tl.float32) * w.to(tl.float32)[:, None]
    return acc + tl.load(bias + offs_k, mask=mask_k, other=0.0).to(tl.float32)[:, None]


@triton.jit
def _head(feat, w_head, b_head, dw_w, dw_b, ksize, bias_row, bias_stride, scale, q_scratch, key_dim, val_dim,
          resolution, offs_k, offs_v, y, x, valid, R_PAD: tl.constexpr, KD_PAD: tl.constexpr,
          PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One head of cascaded group attention on one window, its input ``feat`` (VD_PAD channels × N_PAD tokens) on
    chip: the head's qkv conv (weight ``w_head`` (rows, vd), bias ``b_head``), the k×k depthwise conv on q (weight
    ``dw_w`` (kd, k, k), bias ``dw_b``), softmax attention with the head's bias row; the output before relu,
    (VD_PAD, N_PAD) fp32. q, k, v, p and the output are rounded to the input dtype where eager stores them (every
    product rounds its operands to it anyway)."""
    N_PAD: tl.constexpr = R_PAD * R_PAD
    dtype = q_scratch.dtype.element_ty
    q = _project(w_head, b_head, 0, key_dim, offs_k, feat, offs_v, val_dim, PRECISION, UPCAST)
    # The depthwise conv reads neighbouring tokens: q goes through this program's scratch tile (in the input dtype,
    # as eager stores it), with a barrier before reading it and one before a next head overwrites it.
    q_tile = q_scratch + offs_k[:, None] * N_PAD + tl.arange(0, N_PAD)[None, :]
    tl.store(q_tile, rounded(q, dtype, UPCAST).to(dtype))
    tl.debug_barrier()
    q = _window_depthwise(q_scratch, dw_w, dw_b, ksize, key_dim, resolution, offs_k, y, x, valid, R_PAD, KD_PAD)
    tl.debug_barrier()
    k = _project(w_head, b_head, key_dim, key_dim, offs_k, feat, offs_v, val_dim, PRECISION, UPCAST)
    # keys × queries, so that the value product needs no transpose: out[c, i] = Σ_j v[c, j] P[i, j]
    scores_t = mma(tl.trans(rounded(k, dtype, UPCAST)), rounded(q, dtype, UPCAST), None, PRECISION=PRECISION,
                   UPCAST=UPCAST)
    p_t = _softmax(scores_t, bias_row, bias_stride, scale, resolution, y, x, valid, KEYS_AXIS=0)
    v = _project(w_head, b_head, 2 * key_dim, val_dim, offs_v, feat, offs_v, val_dim, PRECISION, UPCAST)
    return mma(rounded(v, dtype, UPCAST), rounded(p_t, dtype, UPCAST), None, PRECISION=PRECISION, UPCAST=UPCAST)


@triton.jit
def _window(w, n_windows, windows_w, resolution, height, width, val_dim, R_PAD: tl.constexpr, KD_PAD: tl.constexpr,
            VD_PAD: tl.constexpr):
    """Window ``w``'s image; per tile position its token's row, column and validity in the window, and its row and
    column in the map; the key and value channel ranges; the (value channel, token) mask of the map's tokens."""
    b = w // n_windows
    y, x, _, valid = _tokens(resolution, R_PAD)
    gy = (w % n_windows) // windows_w * resolution + y
    gx = (w % n_windows) % windows_w * resolution + x
    offs_v = tl.arange(0, VD_PAD)
    mask = (offs_v < val_dim)[:, None] & (valid & (gy < height) & (gx < width))[None, :]
    return b, y, x, valid, gy, gx, tl.arange(0, KD_PAD), offs_v, mask


@triton.jit
def _packed(weights, heads, key_dim, val_dim):
    """Where each part of the packed ``weights`` starts: every head's qkv weight (rows, vd) and bias (rows,), the
    depthwise biases (kd,) and the depthwise weights (kd, k_i, k_i), in that order. (rows, qkv biases, depthwise
    biases, depthwise weights)."""
    rows = 2 * key_dim + val_dim
    qkv_b = weights + heads * rows * val_dim
    dw_b = qkv_b + heads * rows
    return rows, qkv_b, dw_b, dw_b + heads * key_dim


@triton.jit
def _cga_map_fwd_kernel(x, weights, attention_biases, heads_out, scratch, heads, height, width, windows_w, n_windows,
                        resolution, key_dim, val_dim, kernel_sizes, scale, x_sb, x_sc, x_sh, x_sw, ab_sh, ab_sn,
                        R_PAD: tl.constexpr, KD_PAD: tl.constexpr, VD_PAD: tl.constexpr, PRECISION: tl.constexpr,
                        UPCAST: tl.constexpr):
    N_PAD: tl.constexpr = R_PAD * R_PAD
    w = tl.program_id(0)
    b, y, xx, valid, gy, gx, offs_k, offs_v, mask = _window(w, n_windows, windows_w, resolution, height, width,
                                                            val_dim, R_PAD, KD_PAD, VD_PAD)
    dtype = heads_out.dtype.element_ty
    rows, qkv_b, dw_b, dw_w = _packed(weights, heads, key_dim, val_dim)  # head i's k_i: 2·(2-bit field i) + 1
    x_tokens = x + b * x_sb + gy * x_sh + gx * x_sw
    out_tokens = heads_out + b * heads * val_dim * height * width + gy * width + gx
    q_scratch = scratch + w * KD_PAD * N_PAD
    # The previous head's output (C/h = vd channels), in the input dtype as eager stores it.
    carried = rounded(tl.zeros((VD_PAD, N_PAD), dtype=tl.float32), dtype, UPCAST)
    for i in range(0, heads):
        chunk = tl.load(x_tokens[None, :] + (i * val_dim + offs_v)[:, None] * x_sc, mask=mask, other=0.0)
        feat = rounded(chunk.to(tl.float32) + carried.to(tl.float32), dtype, UPCAST)
        ksize = (kernel_sizes >> (2 * i)) % 4 * 2 + 1
        out = _head(feat, weights + i * rows * val_dim, qkv_b + i * rows, dw_w, dw_b + i * key_dim, ksize,
                    attention_biases + i * ab_sh, ab_sn, scale, q_scratch, key_dim, val_dim, resolution, offs_k,
                    offs_v, y, xx, valid, R_PAD, KD_PAD, PRECISION, UPCAST)
        dw_w += key_dim * ksize * ksize
        tl.store(out_tokens[None, :] + (i * val_dim + offs_v)[:, None] * height * width,
                 rounded(tl.where(out > 0, out, 0.0), dtype, UPCAST).to(dtype), mask=mask)
        carried = rounded(out, dtype, UPCAST)


@triton.jit
def _cga_head_fwd_kernel(x, carried, weights, attention_biases, heads_out, carry_out, scratch, head, heads, height,
                         width, windows_w, n_windows, resolution, key_dim, val_dim, ksize, dw_offset, scale,
                         x_sb, x_sc, x_sh, x_sw, ab_sh, ab_sn, R_PAD: tl.constexpr, KD_PAD: tl.constexpr,
                         VD_PAD: tl.constexpr, FIRST: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Head ``head`` of every window, for heads too wide for :func:`_cga_map_fwd_kernel`: its input is its chunk
    of x plus the previous head's output ``carried`` (absent for the first head); it writes relu of its output into
    ``heads_out`` and the output into ``carry_out``, the next head's ``carried``. Both are (windows, VD_PAD, N_PAD)
    tiles, whole windows: the cascade carries values at the padded positions too, as the original does on its
    zero-padded map. Same packed ``weights`` as the whole-map kernel; ``dw_offset``: where this head's depthwise
    weights start."""
    N_PAD: tl.constexpr = R_PAD * R_PAD
    w = tl.program_id(0)
    b, y, xx, valid, gy, gx, offs_k, offs_v, mask = _window(w, n_windows, windows_w, resolution, height, width,
                                                            val_dim, R_PAD, KD_PAD, VD_PAD)
    dtype = heads_out.dtype.element_ty
    rows, qkv_b, dw_b, dw_w = _packed(weights, heads, key_dim, val_dim)
    tile = w * VD_PAD * N_PAD + offs_v[:, None] * N_PAD + tl.arange(0, N_PAD)[None, :]
    feat = tl.load(x + b * x_sb + (head * val_dim + offs_v)[:, None] * x_sc + (gy * x_sh + gx * x_sw)[None, :],
                   mask=mask, other=0.0)
    if not FIRST:
        feat = rounded(feat.to(tl.float32) + tl.load(carried + tile).to(tl.float32), dtype, UPCAST)
    out = _head(feat, weights + head * rows * val_dim, qkv_b + head * rows, dw_w + dw_offset,
                dw_b + head * key_dim, ksize, attention_biases + head * ab_sh, ab_sn, scale,
                scratch + w * KD_PAD * N_PAD, key_dim, val_dim, resolution, offs_k, offs_v, y, xx, valid, R_PAD, KD_PAD,
                PRECISION, UPCAST)
    tl.store(heads_out + (b * heads + head) * val_dim * height * width + offs_v[:, None] * height * width
             + (gy * width + gx)[None, :], rounded(tl.where(out > 0, out, 0.0), dtype, UPCAST).to(dtype), mask=mask)
    tl.store(carry_out + tile, rounded(out, dtype, UPCAST).to(dtype))


MAP_KERNEL_SIZES = (1, 3, 5, 7)
"""The depthwise kernel sizes of the whole-map kernel (2 bits per head in one argument)."""
MAP_MAX_HEADS = 15


def map_warps(dtype: torch.dtype, resolution: int, val_dim: int) -> int | None:
    """The warps of the whole-map kernel for ``dtype`` inputs, R×R windows and heads of ``val_dim`` channels (4 on
    windows of up to 16 tokens, 8 on larger ones and for fp32 heads of 64 channels, whose TF32 build spills 56 B on
    4 warps under triton 3.6), or None where it would spill registers on sm_90 under triton 3.6 or 3.8: heads wider
    than 64 channels on windows of up to 16 tokens, wider than 32 on larger ones (under 3.6, 64-channel heads on 7×7
    windows spill 32 B in fp16/bf16 and 544 B in fp32, 128-channel heads on 4×4 windows 380 B, whatever the warps;
    the head kernel, which carries nothing from head to head, does not)."""
    r_pad, vd_pad = grid_side(resolution), dot_size(val_dim)
    if vd_pad > (64 if r_pad == 4 else 32):
        return None
    return 4 if r_pad == 4 and not (dtype == torch.float32 and vd_pad == 64) else 8


HEAD_WARPS = 8
HEAD_MAX_VD_PAD = 128  # every released value dim (up to 112); wider heads are neither compiled nor tested


def head_warps(dtype: torch.dtype, resolution: int, val_dim: int) -> int | None:
    """The warps of the head kernel (one launch per head, for fp16/bf16 heads up to 128 channels wide), or None: in
    fp32, whose products run on FMA units with their operands in registers, the heads the whole-map kernel leaves
    (64 channels on 7×7 windows) spill under triton 3.6 (24-184 B)."""
    return None if dtype == torch.float32 or dot_size(val_dim) > HEAD_MAX_VD_PAD else HEAD_WARPS


def whole_map_heads(x: torch.Tensor, qkv_weights: list[torch.Tensor], qkv_biases: list[torch.Tensor],
                    dw_weights: list[torch.Tensor], dw_biases: list[torch.Tensor], attention_biases: torch.Tensor,
                    key_dim: int, window: int) -> torch.Tensor:
    """relu of the concatenated head outputs of cascaded group attention over a whole map ``x`` (B, C, H, W), any
    strides, zero padded bottom/right to whole windows: (B, h·vd, H, W), contiguous, in x's dtype. One program per
    window runs every head (qkv conv, depthwise on q, attention) with the window on chip where :func:`map_warps`
    allows; else one launch per head (:func:`head_warps`), each head's output passed to the next through memory.
    C/h = vd, at most :data:`MAP_MAX_HEADS` heads with kernel sizes in :data:`MAP_KERNEL_SIZES`."""
    batch, _, height, width = x.shape
    heads, val_dim = len(qkv_weights), qkv_weights[0].shape[0] - 2 * key_dim
    windows_h, windows_w = cdiv(height, window), cdiv(width, window)
    weights = torch.cat([t.reshape(-1) for t in (*qkv_weights, *qkv_biases, *dw_biases, *dw_weights)])
    out = torch.empty(batch, heads * val_dim, height, width, device=x.device, dtype=x.dtype)
    n_programs = batch * windows_h * windows_w
    r_pad, kd_pad, vd_pad = grid_side(window), dot_size(key_dim), dot_size(val_dim)
    scratch = torch.empty(n_programs, kd_pad, r_pad * r_pad, device=x.device, dtype=x.dtype)
    if not n_programs:
        return out
    geometry = (height, width, windows_w, windows_h * windows_w, window, key_dim, val_dim)
    constexprs = {"R_PAD": r_pad, "KD_PAD": kd_pad, "VD_PAD": vd_pad, **dot_mode(x.dtype, "matmul")}
    warps = map_warps(x.dtype, window, val_dim)
    if warps is not None:
        kernel_sizes = sum(w.shape[-1] // 2 << 2 * i for i, w in enumerate(dw_weights))
        _cga_map_fwd_kernel[(n_programs,)](
            x, weights, attention_biases, out, scratch, heads, *geometry, kernel_sizes, key_dim ** -0.5, *x.stride(),
            *attention_biases.stride(), num_warps=warps, **constexprs)
        return out
    carried = [torch.empty(n_programs, vd_pad, r_pad * r_pad, device=x.device, dtype=x.dtype) for _ in range(2)]
    dw_offset = 0
    for i, dw in enumerate(dw_weights):
        _cga_head_fwd_kernel[(n_programs,)](
            x, carried[(i + 1) % 2], weights, attention_biases, out, carried[i % 2], scratch, i, heads, *geometry,
            dw.shape[-1], dw_offset, key_dim ** -0.5, *x.stride(), *attention_biases.stride(), FIRST=i == 0,
            num_warps=head_warps(x.dtype, window, val_dim), **constexprs)
        dw_offset += dw.numel()
    return out


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_row: torch.Tensor, resolution: int,
            scale: float) -> torch.Tensor:
    """q, k (B', kd, N), v (B', vd, N), bias_row (R²,) → (B', vd, N), contiguous, in q's dtype."""
    n_windows, key_dim, n_tokens = q.shape
    val_dim = v.shape[1]
    out = torch.empty(n_windows, val_dim, n_tokens, device=q.device, dtype=q.dtype)
    if n_windows:
        _cga_fwd_kernel[(n_windows,)](
            q, k, v, bias_row, out, n_tokens, resolution, key_dim, val_dim, scale,
            *_strides(q), *_strides(k), *_strides(v), bias_row.stride(0),
            R_PAD=grid_side(resolution), BLOCK_D=BLOCK_D, **dot_mode(q.dtype, "matmul"))
    return out


def backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_row: torch.Tensor, grad_out: torch.Tensor,
             resolution: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), contiguous in q's dtype, and the bias row's gradient (R²,) in fp32. ``grad_out`` may have
    any strides, stride 0 included."""
    n_windows, key_dim, n_tokens = q.shape
    val_dim = v.shape[1]
    if span(grad_out) >= 2**31:  # strides beyond 32-bit offsets; its contiguous copy has out's (checked) size
        grad_out = grad_out.contiguous()
    grad_q, grad_k, grad_v = (torch.empty(t.shape, device=t.device, dtype=t.dtype) for t in (q, k, v))
    partial = torch.empty(n_windows, n_tokens, device=q.device, dtype=torch.float32)
    r_pad = grid_side(resolution)
    if n_windows:
        _cga_bwd_kernel[(n_windows,)](
            q, k, v, bias_row, grad_out, grad_q, grad_k, grad_v, partial, n_tokens, resolution, key_dim, val_dim,
            scale, *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), bias_row.stride(0),
            R_PAD=r_pad, BLOCK_D=BLOCK_D, BINS=_BINS, num_warps=_backward_warps(r_pad), **dot_mode(q.dtype, "matmul"))
    return grad_q, grad_k, grad_v, partial.sum(dim=0)


def compile_configs():
    """Every (kernel, signature, constexprs, options) the launchers above can request: CI compiles each one ahead of
    time for sm_90, so an error only the GPU compiler would raise fails there instead of on a user's GPU. The bias
    row (table) is either in the input dtype (folded inference weights) or fp32 (the parameter under autocast); the
    whole-map and head kernels are compiled for key dim 16 (every released model's)."""
    pointers = {"q", "k", "v", "out", "grad", "grad_q", "grad_k", "grad_v"}
    for dtype, ptr in POINTER_TYPES.items():
        for bias_ptr in sorted({ptr, "*fp32"}):
            special = {"bias_row": bias_ptr, "bias_partial": "*fp32", "scale": "fp32"}
            for r_pad in sorted({grid_side(r) for r in range(1, MAX_RESOLUTION + 1)}):
                for kernel, mode in itertools.product((_cga_fwd_kernel, _cga_bwd_kernel), compiled_dot_modes(dtype)):
                    constexprs = {"R_PAD": r_pad, "BLOCK_D": BLOCK_D, **mode}
                    options = {}
                    if kernel is _cga_bwd_kernel:
                        constexprs["BINS"] = _BINS
                        options["num_warps"] = _backward_warps(r_pad)
                    yield kernel, signature(kernel, ptr, constexprs, pointers, special), constexprs, options
                map_special = {"attention_biases": bias_ptr, "scale": "fp32"}
                for vd_pad, mode in itertools.product((16, 32, 64, HEAD_MAX_VD_PAD), compiled_dot_modes(dtype)):
                    constexprs = {"R_PAD": r_pad, "KD_PAD": BLOCK_D, "VD_PAD": vd_pad, **mode}
                    warps = map_warps(dtype, r_pad, vd_pad)
                    if warps is not None:
                        yield (_cga_map_fwd_kernel, signature(_cga_map_fwd_kernel, ptr, constexprs,
                                                              {"x", "weights", "heads_out", "scratch"}, map_special),
                               constexprs, {"num_warps": warps})
                    elif head_warps(dtype, r_pad, vd_pad) is not None:
                        for first in (True, False):
                            head_constexprs = {**constexprs, "FIRST": first}
                            yield (_cga_head_fwd_kernel,
                                   signature(_cga_head_fwd_kernel, ptr, head_constexprs,
                                             {"x", "carried", "weights", "heads_out", "carry_out", "scratch"},
                                             map_special),
                                   head_constexprs, {"num_warps": head_warps(dtype, r_pad, vd_pad)})
