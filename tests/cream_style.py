"""A small EfficientViT in the style of microsoft/Cream's ``EfficientViT/classification/model/efficientvit.py``.

Written for the tests from docs/ops.md ("Cascaded group attention and window attention", "ffn", "norm_linear"):
the same class names, child names and attributes as Cream's code (which
patch rules recognise), and the same behaviour where it differs from timm:
- ``Conv2d_BN`` names its children ``c``/``bn``; ``BN_Linear`` ``bn``/``l``; the value dim is ``d``;
- ``CascadedGroupAttention`` scales after ``qᵀk``, keeps ``attention_bias_idxs`` as a persistent buffer, and in
  eval mode reads a bias table ``ab`` gathered when ``train(False)`` was called (stale if the biases change);
- ``LocalWindowAttention`` accepts only its configured resolution and runs it unsplit when it fits one window.
``build_cream_model()`` builds a two-stage model in well under a second: an 8×8 stage (window 7, so padded to
14×14 and split in 4 windows) and a 4×4 stage (attention built with R = 4).
"""

from __future__ import annotations

import itertools

import torch
from timm.layers import SqueezeExcite
from torch import nn


class Conv2d_BN(nn.Sequential):
    def __init__(self, in_chs, out_chs, ks=1, stride=1, pad=0, dilation=1, groups=1, bn_weight_init=1.0):
        super().__init__()
        self.add_module("c", nn.Conv2d(in_chs, out_chs, ks, stride, pad, dilation, groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(out_chs))
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)


class BN_Linear(nn.Sequential):
    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.add_module("bn", nn.BatchNorm1d(in_features))
        self.add_module("l", nn.Linear(in_features, out_features, bias=bias))
        nn.init.trunc_normal_(self.l.weight, std=0.02)
        if bias:
            nn.init.zeros_(self.l.bias)


class Residual(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return x + self.m(x)


class FFN(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.pw1 = Conv2d_BN(dim, hidden)
        self.act = nn.ReLU()
        self.pw2 = Conv2d_BN(hidden, dim, bn_weight_init=0.0)

    def forward(self, x):
        return self.pw2(self.act(self.pw1(x)))


class PatchMerging(nn.Module):
    def __init__(self, dim, out_dim):
        super().__init__()
        hidden = 4 * dim
        self.conv1 = Conv2d_BN(dim, hidden)
        self.act = nn.ReLU()
        self.conv2 = Conv2d_BN(hidden, hidden, 3, 2, 1, groups=hidden)
        self.se = SqueezeExcite(hidden, 0.25)
        self.conv3 = Conv2d_BN(hidden, out_dim)

    def forward(self, x):
        return self.conv3(self.se(self.act(self.conv2(self.act(self.conv1(x))))))


class CascadedGroupAttention(nn.Module):
    def __init__(self, dim, key_dim, num_heads=8, attn_ratio=4, resolution=14, kernels=(5, 5, 5, 5)):
        super().__init__()
        self.num_heads = num_heads
        self.scale = key_dim ** -0.5
        self.key_dim = key_dim
        self.d = int(attn_ratio * key_dim)
        self.attn_ratio = attn_ratio
        self.qkvs = nn.ModuleList(Conv2d_BN(dim // num_heads, 2 * key_dim + self.d) for _ in range(num_heads))
        self.dws = nn.ModuleList(Conv2d_BN(key_dim, key_dim, k, 1, k // 2, groups=key_dim)
                                 for k in kernels[:num_heads])
        self.proj = nn.Sequential(nn.ReLU(), Conv2d_BN(self.d * num_heads, dim, bn_weight_init=0.0))
        # Offsets numbered in order of first appearance, scanning point pairs row-major (as Cream does).
        points = list(itertools.product(range(resolution), range(resolution)))
        offset_ids: dict[tuple[int, int], int] = {}
        idxs = [offset_ids.setdefault((abs(a[0] - b[0]), abs(a[1] - b[1])), len(offset_ids))
                for a in points for b in points]
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, len(offset_ids)))
        self.register_buffer("attention_bias_idxs", torch.tensor(idxs).view(len(points), len(points)))

    @torch.no_grad()
    def train(self, mode=True):
        super().train(mode)
        if mode and hasattr(self, "ab"):
            del self.ab
        else:
            self.ab = self.attention_biases[:, self.attention_bias_idxs]
        return self

    def forward(self, x):
        B, _, H, W = x.shape
        bias = self.attention_biases[:, self.attention_bias_idxs] if self.training else self.ab
        inputs = x.chunk(self.num_heads, dim=1)
        outputs = []
        feat = inputs[0]
        for i in range(self.num_heads):
            if i > 0:
                feat = feat + inputs[i]
            q, k, v = self.qkvs[i](feat).split([self.key_dim, self.key_dim, self.d], dim=1)
            q = self.dws[i](q).flatten(2)
            k, v = k.flatten(2), v.flatten(2)
            attn = ((q.transpose(1, 2) @ k) * self.scale + bias[i]).softmax(dim=-1)
            feat = (v @ attn.transpose(1, 2)).view(B, self.d, H, W)
            outputs.append(feat)
        return self.proj(torch.cat(outputs, dim=1))


class LocalWindowAttention(nn.Module):
    def __init__(self, dim, key_dim, num_heads=8, attn_ratio=4, resolution=14, window_resolution=7,
                 kernels=(5, 5, 5, 5)):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.resolution = resolution
        self.window_resolution = window_resolution
        self.attn = CascadedGroupAttention(dim, key_dim, num_heads, attn_ratio,
                                           min(window_resolution, resolution), kernels)

    def forward(self, x):
        B, C, H, W = x.shape
        assert (H, W) == (self.resolution, self.resolution), f"expected a {self.resolution}² map, got {H}×{W}"
        ws = self.window_resolution
        if H <= ws and W <= ws:
            return self.attn(x)
        pad_b, pad_r = (ws - H % ws) % ws, (ws - W % ws) % ws
        x = torch.nn.functional.pad(x.permute(0, 2, 3, 1), (0, 0, 0, pad_r, 0, pad_b))
        nH, nW = (H + pad_b) // ws, (W + pad_r) // ws
        x = x.view(B, nH, ws, nW, ws, C).transpose(2, 3).reshape(B * nH * nW, ws, ws, C).permute(0, 3, 1, 2)
        x = self.attn(x)
        x = x.permute(0, 2, 3, 1).reshape(B, nH, nW, ws, ws, C).transpose(2, 3).reshape(B, nH * ws, nW * ws, C)
        return x[:, :H, :W].permute(0, 3, 1, 2).contiguous()


class EfficientViTBlock(nn.Module):
    def __init__(self, dim, key_dim, num_heads, attn_ratio, resolution, window_resolution, kernels):
        super().__init__()
        self.dw0 = Residual(Conv2d_BN(dim, dim, 3, 1, 1, groups=dim, bn_weight_init=0.0))
        self.ffn0 = Residual(FFN(dim, 2 * dim))
        self.mixer = Residual(LocalWindowAttention(dim, key_dim, num_heads, attn_ratio, resolution,
                                                   window_resolution, kernels))
        self.dw1 = Residual(Conv2d_BN(dim, dim, 3, 1, 1, groups=dim, bn_weight_init=0.0))
        self.ffn1 = Residual(FFN(dim, 2 * dim))

    def forward(self, x):
        return self.ffn1(self.dw1(self.mixer(self.ffn0(self.dw0(x)))))


def _dw_ffn(dim):
    return nn.Sequential(Residual(Conv2d_BN(dim, dim, 3, 1, 1, groups=dim)), Residual(FFN(dim, 2 * dim)))


class CreamEfficientViT(nn.Module):
    """Patch embedding (stride 16) → stage 1 → subsample (stride 2) → stage 2 → pooled BN_Linear head."""

    def __init__(self, img_size=128, num_classes=10, embed_dim=(32, 48), key_dim=16, num_heads=(2, 3),
                 window_size=7, kernels=(7, 5, 3, 3)):
        super().__init__()
        e0 = embed_dim[0]
        self.patch_embed = nn.Sequential(
            Conv2d_BN(3, e0 // 8, 3, 2, 1), nn.ReLU(), Conv2d_BN(e0 // 8, e0 // 4, 3, 2, 1), nn.ReLU(),
            Conv2d_BN(e0 // 4, e0 // 2, 3, 2, 1), nn.ReLU(), Conv2d_BN(e0 // 2, e0, 3, 2, 1))
        resolution = img_size // 16
        stages = []
        for i, (dim, heads) in enumerate(zip(embed_dim, num_heads, strict=True)):
            blocks = []
            if i > 0:
                blocks += [_dw_ffn(embed_dim[i - 1]), PatchMerging(embed_dim[i - 1], dim), _dw_ffn(dim)]
                resolution = (resolution - 1) // 2 + 1
            blocks.append(EfficientViTBlock(dim, key_dim, heads, dim / (key_dim * heads), resolution, window_size,
                                            kernels))
            stages.append(nn.Sequential(*blocks))
        self.blocks1, self.blocks2 = stages
        self.head = BN_Linear(embed_dim[-1], num_classes)

    def forward(self, x):
        x = self.blocks2(self.blocks1(self.patch_embed(x)))
        return self.head(torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


def build_cream_model(num_classes: int = 10, img_size: int = 128) -> CreamEfficientViT:
    """The tiny Cream-style model. Like Cream's, it accepts only img_size × img_size inputs (its window
    attention asserts the map size it was built for). At 128 px the maps are 8×8 (padded to 14×14, 4 windows of
    7×7) and then 4×4 (attention built with R = 4)."""
    return CreamEfficientViT(img_size=img_size, num_classes=num_classes)
