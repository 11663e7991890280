"""``FusedResidualFFN``: drop-in for the residual-wrapped feed-forward block of EfficientViT-M — timm
``efficientvit_msra.ResidualDrop(ConvMlp)`` and Cream ``Residual(FFN)`` — running ``x + pw2(relu(pw1(x)))`` as
one ``evit::ffn`` call with both BatchNorms folded, so the hidden map (twice the input's size) is never stored."""

from __future__ import annotations

import torch
from torch import nn

from evit_kernels.nn._base import FusedResidual, Unsupported, expect_match, residual_matches
from evit_kernels.nn._fold import FoldCache, foldable
from evit_kernels.nn._match import TIMM_MSRA, Match
from evit_kernels.nn.conv_bn_act import check_conv_norm, conv_and_norm
from evit_kernels.ops.ffn import ffn

CONV_MLP = Match("timm", "ConvMlp", (TIMM_MSRA,), ("pw1", "act", "pw2"))
FFN = Match("Cream", "FFN", None, ("pw1", "act", "pw2"))


def _check_pointwise(module: nn.Module | None, role: str) -> None:
    conv, _ = check_conv_norm(module, role)
    if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.groups != 1 or conv.padding != (0, 0) \
            or conv.dilation != (1, 1):
        raise Unsupported(f"{role}'s conv {conv!r} is not a plain 1×1 nn.Conv2d (stride 1, no padding, groups 1)")


class FusedResidualFFN(FusedResidual):
    """Drop-in for ``x + m(x)`` where ``m`` is a 1×1 ConvNorm C→hidden, nn.ReLU, 1×1 ConvNorm hidden→C.

    Both BatchNorms on running statistics and no active stochastic depth (eval, or ``drop`` 0): one op call
    with the folded weights (cached until a parameter, buffer or ``eps`` changes) and ``residual=x``.
    Otherwise the original's own forward, so batch statistics, running-stat updates and timm's per-sample drop
    are exactly the original's. ``m.pw1`` / ``m.pw2`` may themselves be patched into ``FusedConvNormAct``.
    """

    MATCHES = residual_matches(CONV_MLP, FFN)

    def __init__(self, original: nn.Module, backend: str = "auto"):
        super().__init__(original, backend)
        if set(self._modules) != {"m"}:
            raise Unsupported(f"has children {sorted(self._modules)}, expected the residual branch m alone")
        m = self._modules["m"]
        block = expect_match(m, (CONV_MLP, FFN), "wraps", "a feed-forward block (ConvMlp / FFN)")
        if set(m._modules) != set(block.attributes):
            raise Unsupported(f"the feed-forward block has children {sorted(m._modules)}, expected "
                              f"{', '.join(block.attributes)}")
        if type(m.act) is not nn.ReLU:
            raise Unsupported(f"activation {m.act!r} is not nn.ReLU")
        _check_pointwise(m.pw1, "pw1")
        _check_pointwise(m.pw2, "pw2")
        (conv1, _), (conv2, _) = conv_and_norm(m.pw1), conv_and_norm(m.pw2)
        if conv2.in_channels != conv1.out_channels or conv2.out_channels != conv1.in_channels:
            raise Unsupported(f"pw1 {conv1.in_channels}→{conv1.out_channels} and pw2 "
                              f"{conv2.in_channels}→{conv2.out_channels} do not form a C→hidden→C block")
        self._fold_cache = FoldCache()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self._modules["m"]
        (conv1, norm1), (conv2, norm2) = conv_and_norm(m.pw1), conv_and_norm(m.pw2)
        if self._stochastic_depth_active() or not (foldable(norm1) and foldable(norm2)):
            return self._run_original(x)
        (w1, b1), (w2, b2) = self._fold_cache.fold([(conv1, norm1), (conv2, norm2)])
        return ffn(x, w1, b1, w2, b2, residual=x, backend=self.backend)
