"""``FusedResidualBlock``: drop-in for the MIT family's ``ResidualBlock`` (timm ``efficientvit_mit``, mit-han-lab /
efficientsam) around a block that ends in a conv + BatchNorm (+ activation) layer — ``LiteMLA`` (the context module
of every EfficientViT block, ending in ``proj``) and the two-conv block of the L-series and SAM stems (timm
``ConvBlock``, mit-han-lab ``ResBlock``, ending in ``conv2``) — with an identity shortcut: the shortcut is that last
layer's ``residual``, added in its own ``conv_bn_act`` call, so the block's output is written once instead of
written, read back and written again by a separate add."""

from __future__ import annotations

import torch
from torch import nn

from evit_kernels.nn._base import FusedModule, Unsupported, expect_match
from evit_kernels.nn._match import MIT_HAN_LAB, TIMM_MIT, Match
from evit_kernels.nn.conv_block import check_conv_layer, identity_shortcut, residual_blocks
from evit_kernels.nn.conv_bn_act import with_residual
from evit_kernels.nn.lite_mla import LITE_MLA, FusedLiteMLA

TWO_CONV_BLOCKS = (Match("timm", "ConvBlock", (TIMM_MIT,), ("conv1", "conv2")),
                   Match("mit-han-lab", "ResBlock", MIT_HAN_LAB, ("conv1", "conv2")))
"""conv1 → conv2, each a conv + norm + activation layer."""


class FusedResidualBlock(FusedModule):
    """Drop-in for ``main(x) + x``, ``main`` a LiteMLA or a two-conv block (see the module docstring), no pre-norm
    or post-activation.

    The last layer runs with ``residual=x`` (:func:`evit_kernels.nn.conv_bn_act.with_residual`: in its op call when
    it is a ``FusedConvNormAct``, which folds its BatchNorm on running statistics; otherwise, and in training, the
    layer's own forward then the add, as the original). Under autocast an fp32 ``x`` is added as it is, the sum
    fp32 as the original's (docs/ops.md, "Inputs wider than the compute dtype").
    """

    MATCHES = residual_blocks((*TWO_CONV_BLOCKS, LITE_MLA))

    def __init__(self, original: nn.Module, backend: str = "auto"):
        super().__init__(original, backend)
        if not identity_shortcut(original):
            raise Unsupported("no shortcut: the block is its main branch alone")
        main = self._modules["main"]
        self.kind = expect_match(main, (*TWO_CONV_BLOCKS, LITE_MLA), "main is", "a LiteMLA or a two-conv block"
                                 ).class_name
        if self.kind == "LiteMLA":
            return
        if set(main._modules) != {"conv1", "conv2"}:
            raise Unsupported(f"the {self.kind} has children {sorted(main._modules)}, expected conv1 and conv2")
        for name in ("conv1", "conv2"):
            check_conv_layer(name, main._modules[name])
        conv1, conv2 = main._modules["conv1"]._modules["conv"], main._modules["conv2"]._modules["conv"]
        if conv1.in_channels != conv2.out_channels or conv1.stride != (1, 1) or conv2.stride != (1, 1):
            raise Unsupported("the identity shortcut needs a block that keeps the channels and the resolution")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        main = self._modules["main"]
        if self.kind == "LiteMLA":
            return main(x, residual=x) if isinstance(main, FusedLiteMLA) else main(x) + x
        return with_residual(main._modules["conv2"], main._modules["conv1"](x), x)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, " + super().extra_repr()
