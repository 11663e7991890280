"""The layers that downsample EfficientViT-M maps, with each activation in the epilogue of the conv before it
(eager runs each as its own pass over the map):

- ``FusedPatchEmbedding``: the stem (timm ``efficientvit_msra.PatchEmbedding``): four 3×3 stride-2 ConvNorms with a
  ReLU after each of the first three;
- ``FusedPatchMerging``: the block between stages (timm ``efficientvit_msra.PatchMerging``, Cream ``PatchMerging``):
  conv1 (1×1) → act → conv2 (3×3 depthwise, stride 2) → act → squeeze-excite → conv3 (1×1). conv1 and conv2 are
  one ``evit::conv_block`` call without a projection, so the expanded map (four times the input's channels at its
  full resolution, the largest tensor of the block) never leaves the chip.

Each conv is a ConvNorm / Conv2d_BN; with every BatchNorm on running statistics they run as ``evit::conv_bn_act``
(and ``evit::conv_block``) calls with the BatchNorms folded (cached until a parameter, buffer or ``eps`` changes),
otherwise as the original's forward."""

from __future__ import annotations

import torch
from torch import nn

from evit_kernels.nn._base import FusedModule, Unsupported
from evit_kernels.nn._fold import FoldCache, foldable
from evit_kernels.nn._match import TIMM_MSRA, Match
from evit_kernels.nn.conv_bn_act import activation_name, check_conv_norm, conv_and_norm
from evit_kernels.ops.conv_block import conv_block
from evit_kernels.ops.conv_bn_act import conv_bn_act


class _FusedConvStack(FusedModule):
    """A fixed sequence of ConvNorm children, each with the activation child that follows it and the child that
    runs as it is before the next conv (names; None: none)."""

    LAYERS: tuple[tuple[str, str | None, str | None], ...]
    """(conv, activation after it, child run after that), in order."""
    CHILDREN: tuple[str, ...]

    def __init__(self, original: nn.Module, backend: str = "auto"):
        super().__init__(original, backend)
        if tuple(self._modules) != self.CHILDREN:
            raise Unsupported(f"has children {list(self._modules)}, expected {list(self.CHILDREN)}")
        for conv, _, _ in self.LAYERS:
            check_conv_norm(self._modules[conv], conv)
        self.activations = [activation_name(self._modules[act]) if act else "none" for _, act, _ in self.LAYERS]
        self._fold_cache = FoldCache()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = [conv_and_norm(self._modules[conv]) for conv, _, _ in self.LAYERS]
        if not all(foldable(norm) for _, norm in layers):
            if isinstance(self.original, nn.Sequential):  # its forward iterates over itself
                for child in self._modules.values():
                    x = child(x)
                return x
            return type(self.original).forward(self, x)
        return self._folded_forward(x, [conv for conv, _ in layers], self._fold_cache.fold(layers))

    def _folded_forward(self, x: torch.Tensor, convs: list[nn.Conv2d], folded: list[tuple]) -> torch.Tensor:
        """The stack with its BatchNorms folded (``folded``: each conv's weight and bias): one conv_bn_act a conv."""
        for conv, (weight, bias), activation, (_, _, after) in zip(convs, folded, self.activations, self.LAYERS,
                                                                   strict=True):
            x = conv_bn_act(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups, activation,
                            backend=self.backend)
            if after is not None:
                x = self._modules[after](x)
        return x

    def extra_repr(self) -> str:
        return f"activations={self.activations!r}, {super().extra_repr()}"


_EMBEDDING = ("conv1", "relu1", "conv2", "relu2", "conv3", "relu3", "conv4")


class FusedPatchEmbedding(_FusedConvStack):
    """Drop-in for timm's ``PatchEmbedding`` stem: four ``evit::conv_bn_act`` calls, the ReLUs in the first three."""

    MATCHES = (Match("timm", "PatchEmbedding", (TIMM_MSRA,), _EMBEDDING),)
    LAYERS = (("conv1", "relu1", None), ("conv2", "relu2", None), ("conv3", "relu3", None), ("conv4", None, None))
    CHILDREN = _EMBEDDING


_MERGING = ("conv1", "act", "conv2", "se", "conv3")


class FusedPatchMerging(_FusedConvStack):
    """Drop-in for ``PatchMerging``: conv1 → act → conv2 → act as one ``evit::conv_block`` without a projection
    (where conv1 is 1×1 and conv2 undilated; else two ``evit::conv_bn_act`` calls), the original's squeeze-excite,
    then conv3 as an ``evit::conv_bn_act`` call."""

    MATCHES = (Match("timm", "PatchMerging", (TIMM_MSRA,), _MERGING), Match("Cream", "PatchMerging", None, _MERGING))
    LAYERS = (("conv1", "act", None), ("conv2", "act", "se"), ("conv3", None, None))
    CHILDREN = _MERGING

    def _folded_forward(self, x: torch.Tensor, convs: list[nn.Conv2d], folded: list[tuple]) -> torch.Tensor:
        conv1, conv2, conv3 = convs
        expand = (conv1.kernel_size, conv1.stride, conv1.padding, conv1.dilation, conv1.groups) == (
            (1, 1), (1, 1), (0, 0), (1, 1), 1)
        if not expand or conv2.dilation != (1, 1):
            return super()._folded_forward(x, convs, folded)
        (w1, b1), (w2, b2), (w3, b3) = folded
        act1, act2, _ = self.activations
        d = conv_block(x, w1, b1, w2, b2, None, None, stride=conv2.stride, padding=conv2.padding, groups=conv2.groups,
                       activations=(act1, act2, "none"), backend=self.backend)
        return conv_bn_act(self.se(d), w3, b3, conv3.stride, conv3.padding, conv3.dilation, conv3.groups, "none",
                           backend=self.backend)
