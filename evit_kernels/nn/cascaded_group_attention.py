"""Drop-in replacements for MSRA EfficientViT's ``CascadedGroupAttention`` and ``LocalWindowAttention``.

Both timm (``timm.models.efficientvit_msra``: ``ConvNorm`` blocks with ``conv``/``bn``, value dim ``val_dim``)
and Cream-style code (``Conv2d_BN`` blocks with ``c``/``bn``, value dim ``d``, an eval-time ``ab`` bias cache
that is never refreshed and so is never read here) are accepted.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from evit_kernels.nn._base import FusedModule, Unsupported
from evit_kernels.nn._fold import FoldCache, foldable
from evit_kernels.nn._match import TIMM_MSRA, Match
from evit_kernels.nn.conv_bn_act import check_conv_norm, conv_and_norm
from evit_kernels.ops.cascaded_group_attention import (
    attention_bias_index,
    cascade_heads,
    cascaded_group_attention,
    window_merge,
    window_partition,
)

_ATTENTION = ("qkvs", "dws", "proj", "attention_biases", "attention_bias_idxs", "key_dim", "num_heads", "scale")
_WINDOWS = ("attn", "resolution", "window_resolution")
TIMM_LOCAL_WINDOW_ATTENTION = Match("timm", "LocalWindowAttention", (TIMM_MSRA,), _WINDOWS)


def window_of(attn: nn.Module) -> int:
    """The window side R of a cascaded group attention, read off its (R², R²) bias index."""
    idxs = getattr(attn, "attention_bias_idxs", None)
    if not isinstance(idxs, torch.Tensor) or idxs.dim() != 2:
        raise Unsupported(f"{type(attn).__name__} has no (N, N) attention_bias_idxs buffer")
    n = idxs.shape[0]
    side = math.isqrt(n)
    if side * side != n:
        raise Unsupported(f"attention_bias_idxs has {n} rows, not a square number of window tokens")
    return side


class FusedCascadedGroupAttention(FusedModule):
    """``CascadedGroupAttention`` on a window batch (B', C, R, R), through ``evit::cascaded_group_attention`` in
    eval mode (BatchNorm folded into the convs, cached until a parameter or statistic changes) and through the
    original children otherwise (BatchNorm batch statistics and running-stat updates as in the original)."""

    MATCHES = (Match("timm", "CascadedGroupAttention", (TIMM_MSRA,), (*_ATTENTION, "val_dim")),
               Match("Cream", "CascadedGroupAttention", None, (*_ATTENTION, "d")))
    patch_inside = False  # it folds and computes its ConvNorm children itself

    def __init__(self, original: nn.Module, backend: str = "auto"):
        super().__init__(original, backend)
        try:
            self.num_heads = int(original.num_heads)
            self.key_dim = int(original.key_dim)
            self.val_dim = int(original.val_dim if hasattr(original, "val_dim") else original.d)
            scale = float(original.scale)
            qkvs, dws, proj = original.qkvs, original.dws, original.proj
            biases, idxs = original.attention_biases, original.attention_bias_idxs
        except AttributeError as exc:
            raise Unsupported(f"not a cascaded group attention: {exc}") from exc
        self.resolution = window_of(original)
        self._check_structure(qkvs, dws, proj, biases, idxs, scale)
        self._fold_cache = FoldCache()

    def _check_structure(self, qkvs, dws, proj, biases, idxs, scale) -> None:
        h, kd, vd, R = self.num_heads, self.key_dim, self.val_dim, self.resolution
        if not math.isclose(scale, kd ** -0.5, rel_tol=1e-12):
            raise Unsupported(f"scale {scale} is not key_dim**-0.5 = {kd ** -0.5}")
        if not (isinstance(qkvs, nn.ModuleList) and isinstance(dws, nn.ModuleList) and len(qkvs) == len(dws) == h):
            raise Unsupported(f"expected qkvs and dws ModuleLists of num_heads={h} blocks")
        if not (isinstance(proj, nn.Sequential) and len(proj) == 2 and type(proj[0]) is nn.ReLU):
            raise Unsupported("expected proj = Sequential(ReLU, Conv2d + BatchNorm)")
        in_chs = check_conv_norm(qkvs[0], "qkvs[0]")[0].in_channels
        if h > 1 and vd != in_chs:
            raise Unsupported(f"value dim {vd} differs from the per-head input width {in_chs}: the cascade needs both")
        for i in range(h):
            _expect_conv(check_conv_norm(qkvs[i], f"qkvs[{i}]")[0], f"qkvs[{i}]", in_chs, 2 * kd + vd, 1, groups=1)
            dw = check_conv_norm(dws[i], f"dws[{i}]")[0]
            ks = dw.kernel_size[0]
            if ks % 2 == 0:
                raise Unsupported(f"dws[{i}] has an even kernel {dw.kernel_size}; the op pads odd kernels by k//2")
            _expect_conv(dw, f"dws[{i}]", kd, kd, ks, groups=kd)
        proj_conv = check_conv_norm(proj[1], "proj[1]")[0]
        _expect_conv(proj_conv, "proj", h * vd, proj_conv.out_channels, 1, groups=1)
        if tuple(biases.shape) != (h, R * R):
            raise Unsupported(f"attention_biases has shape {tuple(biases.shape)}, expected {(h, R * R)}")
        if not torch.equal(idxs.cpu(), attention_bias_index(R)):
            raise Unsupported("attention_bias_idxs is not the |dy|·R + |dx| offset index")

    def _conv_bn_pairs(self) -> list[tuple[nn.Conv2d, _BatchNorm]]:
        """(conv, bn) of every qkv, then every dw, then the proj block: looked up on each call (SyncBatchNorm
        conversion swaps children), without the structural checks the constructor already made."""
        blocks = [*self.qkvs, *self.dws, self.proj[1]]
        return [conv_and_norm(b) for b in blocks]

    def _foldable(self, pairs: list[tuple[nn.Conv2d, _BatchNorm]]) -> bool:
        return not self.training and all(foldable(bn) for _, bn in pairs)

    def _folded(self, pairs: list[tuple[nn.Conv2d, _BatchNorm]]
                ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor], Tensor, Tensor]:
        heads = self.num_heads
        folded = self._fold_cache.fold(pairs)
        qkv, dw, (proj_w, proj_b) = folded[:heads], folded[heads:2 * heads], folded[-1]
        return [w for w, _ in qkv], [b for _, b in qkv], [w for w, _ in dw], [b for _, b in dw], proj_w, proj_b

    def _fused(self, x: Tensor, window: int, pairs: list[tuple[nn.Conv2d, _BatchNorm]]) -> Tensor:
        qkv_w, qkv_b, dw_w, dw_b, proj_w, proj_b = self._folded(pairs)
        return cascaded_group_attention(x, qkv_w, qkv_b, dw_w, dw_b, self.attention_biases, proj_w, proj_b,
                                        self.key_dim, window, backend=self.backend)

    def forward(self, x: Tensor) -> Tensor:
        """x: a window batch (B', C, R, R) with R the module's window resolution."""
        R = self.resolution
        if x.dim() != 4 or x.shape[-2:] != (R, R):
            raise ValueError(f"{type(self).__name__}: expected a (B, C, {R}, {R}) window batch, got shape "
                             f"{tuple(x.shape)}; use forward_map for a whole feature map")
        pairs = self._conv_bn_pairs()
        if self._foldable(pairs):
            return self._fused(x, R, pairs)
        return self.proj(cascade_heads(x, self.qkvs, self.dws, self.attention_biases, self.key_dim,
                                       backend=self.backend))

    def forward_map(self, x: Tensor, window: int) -> Tensor:
        """x: a whole (B, C, H, W) map, zero padded bottom/right and split into window×window windows."""
        if window != self.resolution:
            raise ValueError(f"{type(self).__name__}: window {window} differs from the attention's window "
                             f"resolution {self.resolution}")
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__}: expected a (B, C, H, W) map, got shape {tuple(x.shape)}")
        pairs = self._conv_bn_pairs()
        if self._foldable(pairs):
            return self._fused(x, window, pairs)
        windows, meta = window_partition(x, window)
        return window_merge(self(windows), meta)


class FusedLocalWindowAttention(FusedModule):
    """``LocalWindowAttention``: the same window split as the original (timm or Cream-style), with the
    attention computed by ``self.attn`` (a :class:`FusedCascadedGroupAttention` runs the whole map as one op).

    timm runs the map as one window only when it is exactly R×R (R = the attention's window) and pads anything
    else; Cream accepts only the configured ``resolution`` and runs it unsplit when it fits in one window.
    """

    MATCHES = (TIMM_LOCAL_WINDOW_ATTENTION, Match("Cream", "LocalWindowAttention", None, _WINDOWS))

    def __init__(self, original: nn.Module, backend: str = "auto"):
        super().__init__(original, backend)
        try:
            self.dim = int(original.dim)
            self.num_heads = int(original.num_heads)
            self.resolution = int(original.resolution)
            self.window_resolution = int(original.window_resolution)
            attn = original.attn
        except AttributeError as exc:
            raise Unsupported(f"not a local window attention: {exc}") from exc
        self._attention_window = window_of(attn)  # fixed by the attention's bias table
        self.timm_style = TIMM_LOCAL_WINDOW_ATTENTION.defined_here(original)

    def _window(self, x: Tensor) -> int | None:
        """The window side to split ``x`` with, or None when the original runs the map whole."""
        H, W = x.shape[-2:]
        if self.timm_style:
            ws = self._attention_window
            return None if (H, W) == (ws, ws) else ws
        R = self.resolution
        if (H, W) != (R, R):
            raise AssertionError(f"input feature has wrong size, expect {(R, R)}, got {(H, W)}")
        wr = self.window_resolution
        return None if H <= wr and W <= wr else wr

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__}: expected a (B, C, H, W) map, got shape {tuple(x.shape)}")
        window = self._window(x)
        if window is None:
            return self.attn(x)
        if isinstance(self.attn, FusedCascadedGroupAttention):
            return self.attn.forward_map(x, window)
        windows, meta = window_partition(x, window)
        return window_merge(self.attn(windows), meta)


def _expect_conv(conv: nn.Conv2d, name: str, in_chs: int, out_chs: int, ks: int, groups: int) -> None:
    expected = dict(in_channels=in_chs, out_channels=out_chs, kernel_size=(ks, ks), stride=(1, 1),
                    padding=(ks // 2, ks // 2), dilation=(1, 1), groups=groups, padding_mode="zeros")
    actual = {key: getattr(conv, key) for key in expected}
    if actual != expected:
        raise Unsupported(f"{name} conv is {actual}, expected {expected}")
