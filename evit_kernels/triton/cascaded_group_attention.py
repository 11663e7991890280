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

import torch
import triton
import triton.language as tl

from evit_kernels.dispatch import span
from evit_kernels.triton._common import POINTER_TYPES, dot_mode, mma, signature

BLOCK_D = 16  # channel chunk: tl.dot's minimum size; released key/value dims are multiples of it
MAX_RESOLUTION = 8  # N = R² ≤ 64: the N×N fp32 tiles of the backward stay in registers on sm_90
_BINS = 16  # |Δy| and |Δx| take values < R_PAD ≤ 8; padded to tl.dot's minimum


def grid_side(resolution: int) -> int:
    """R_PAD: the side of the padded token grid, a power of two with R_PAD² ≥ 16 (tl.dot's minimum)."""
    return max(4, triton.next_power_of_2(resolution))


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
    offset = tl.abs(y[:, None] - y[None, :]) * resolution + tl.abs(x[:, None] - x[None, :])
    bias = tl.load(bias_row + offset * bias_stride, mask=valid[:, None] & valid[None, :], other=0.0)
    scores = tl.where(valid[None, :], scores * scale + bias.to(tl.float32), float("-inf"))
    exp = tl.exp(scores - tl.max(scores, axis=1)[:, None])
    return exp / tl.sum(exp, axis=1)[:, None]


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
            R_PAD=grid_side(resolution), BLOCK_D=BLOCK_D, **dot_mode(q.dtype))
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
            R_PAD=r_pad, BLOCK_D=BLOCK_D, BINS=_BINS, num_warps=_backward_warps(r_pad), **dot_mode(q.dtype))
    return grad_q, grad_k, grad_v, partial.sum(dim=0)


def compile_configs():
    """Every (kernel, signature, constexprs, options) the launchers above can request: CI compiles each one ahead of
    time for sm_90, so an error only the GPU compiler would raise fails there instead of on a user's GPU. The bias
    row is either in the input dtype (folded inference weights) or fp32 (the parameter under autocast)."""
    pointers = {"q", "k", "v", "out", "grad", "grad_q", "grad_k", "grad_v"}
    for dtype, ptr in POINTER_TYPES.items():
        for bias_ptr in sorted({ptr, "*fp32"}):
            special = {"bias_row": bias_ptr, "bias_partial": "*fp32", "scale": "fp32"}
            for r_pad in sorted({grid_side(r) for r in range(1, MAX_RESOLUTION + 1)}):
                for kernel in (_cga_fwd_kernel, _cga_bwd_kernel):
                    constexprs = {"R_PAD": r_pad, "BLOCK_D": BLOCK_D, **dot_mode(dtype)}
                    options = {}
                    if kernel is _cga_bwd_kernel:
                        constexprs["BINS"] = _BINS
                        options["num_warps"] = _backward_warps(r_pad)
                    yield kernel, signature(kernel, ptr, constexprs, pointers, special), constexprs, options
