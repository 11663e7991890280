"""``FusedConvBlock``: drop-in for the ``ResidualBlock`` around each conv block of the MIT family — ``MBConv``,
``DSConv`` and ``FusedMBConv`` of timm ``efficientvit_mit`` and mit-han-lab (efficientsam), which always sit in one,
with an identity shortcut or none — running the whole block, residual included, as one ``evit::conv_block`` call
with every BatchNorm folded, so the expanded tensor is never stored."""

from __future__ import annotations

import torch
from torch import nn

from evit_kernels.nn._base import FusedModule, Unsupported, expect_match
from evit_kernels.nn._fold import FoldCache, foldable
from evit_kernels.nn._match import MIT_HAN_LAB, TIMM_MIT, Match
from evit_kernels.nn.conv_bn_act import activation_name
from evit_kernels.ops.conv_block import conv_block


def _blocks(family: str, modules: tuple[str, ...]) -> tuple[Match, ...]:
    """The MBConv, DSConv and FusedMBConv of one library; their attributes are their ConvNormAct / ConvLayer
    children, in the order the block applies them."""
    return (Match(family, "MBConv", modules, ("inverted_conv", "depth_conv", "point_conv")),
            Match(family, "DSConv", modules, ("depth_conv", "point_conv")),
            Match(family, "FusedMBConv", modules, ("spatial_conv", "point_conv")))


CONV_BLOCKS = (*_blocks("timm", (TIMM_MIT,)), *_blocks("mit-han-lab", MIT_HAN_LAB))
IDENTITY_LAYER = Match("mit-han-lab", "IdentityLayer", MIT_HAN_LAB)
_LAYER_CHILDREN = {"dropout", "conv", "norm", "act"}


def residual_blocks(main: tuple[Match, ...]) -> tuple[Match, Match]:
    """The MIT family's ``ResidualBlock`` (timm, mit-han-lab) holding one of ``main``."""
    return (Match("timm", "ResidualBlock", (TIMM_MIT,), ("main", "shortcut", "pre_norm"), children=(("main", main),)),
            Match("mit-han-lab", "ResidualBlock", MIT_HAN_LAB, ("main", "shortcut", "pre_norm", "post_act"),
                  children=(("main", main),)))


def identity_shortcut(block: nn.Module) -> bool:
    """Whether a ``ResidualBlock`` adds its input (identity shortcut) or not (no shortcut); :class:`Unsupported` for
    a pre-norm, a post-activation or any other shortcut."""
    if getattr(block, "pre_norm", None) is not None and not isinstance(block.pre_norm, nn.Identity):
        raise Unsupported(f"pre_norm {type(block.pre_norm).__qualname__} before the block")
    if getattr(block, "post_act", None) is not None:
        raise Unsupported(f"post_act {type(block.post_act).__qualname__} after the residual add")
    shortcut = block.shortcut
    if shortcut is not None and type(shortcut) is not nn.Identity and not IDENTITY_LAYER.fits(shortcut):
        raise Unsupported(f"shortcut {type(shortcut).__qualname__} is not an identity")
    return shortcut is not None


def live(module: nn.Module, name: str) -> nn.Module | None:
    """The child ``name`` as it is now (absent and nn.Identity: None)."""
    child = module._modules.get(name)
    return None if isinstance(child, nn.Identity) else child


def check_conv_layer(name: str, layer: nn.Module) -> str:
    """The activation of a conv + norm + activation layer (timm ``ConvNormAct``, mit-han-lab ``ConvLayer``) that the
    conv block ops can run, BatchNorm folded; :class:`Unsupported` for any other."""
    if not set(layer._modules) <= _LAYER_CHILDREN or "conv" not in layer._modules:
        raise Unsupported(f"{name} has children {sorted(layer._modules)}, not a conv + norm + activation layer")
    check_plain_conv(name, layer._modules["conv"])
    norm = live(layer, "norm")
    if norm is not None and not isinstance(norm, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        raise Unsupported(f"{name}'s norm {type(norm).__qualname__} is not a BatchNorm2d")
    return activation_name(live(layer, "act"))


def check_plain_conv(name: str, conv: nn.Module) -> None:
    if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or isinstance(conv.padding, str) \
            or conv.dilation != (1, 1):
        raise Unsupported(f"{name}'s conv {conv!r} is not a plain zero-padded nn.Conv2d without dilation")


def check_pointwise(conv: nn.Conv2d) -> None:
    if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.padding != (0, 0) or conv.groups != 1:
        raise Unsupported(f"{conv!r} is not a 1×1 conv with stride 1, no padding and groups 1")


def check_depthwise(conv: nn.Conv2d) -> None:
    if conv.groups != conv.in_channels:
        raise Unsupported(f"the depthwise conv {conv!r} has groups {conv.groups}, not its width")


def dropout_active(module: nn.Module, layers: list[nn.Module]) -> bool:
    """Whether one of ``layers`` (conv + norm + activation layers of ``module``) drops out in this mode."""
    return module.training and any(isinstance(layer._modules.get("dropout"), nn.Dropout2d | nn.Dropout)
                                   and layer._modules["dropout"].p > 0 for layer in layers)


class FusedConvBlock(FusedModule):
    """Drop-in for a ``ResidualBlock`` holding an MBConv / DSConv / FusedMBConv, with an identity shortcut or none,
    and no pre-norm or post-activation.

    Every BatchNorm on running statistics (or absent) and no active dropout: one op call with the folded weights
    (cached until a parameter, buffer or ``eps`` changes) and ``residual=x`` when the shortcut is an identity.
    Otherwise the layers run one after another as the original runs them, so batch statistics and running-stat
    updates are exactly the original's. The layers may themselves be patched into ``FusedConvNormAct``.
    """

    MATCHES = residual_blocks(CONV_BLOCKS)

    def __init__(self, original: nn.Module, backend: str = "auto"):
        super().__init__(original, backend)
        self._residual = identity_shortcut(original)
        block = self._modules.get("main")
        match = expect_match(block, CONV_BLOCKS, "holds", "an MBConv, DSConv or FusedMBConv")
        self.kind = match.class_name
        self._layer_names = match.attributes
        if set(block._modules) != set(self._layer_names):
            raise Unsupported(f"the {self.kind} has children {sorted(block._modules)}, expected {self._layer_names}")
        self.activations = tuple(check_conv_layer(name, layer) for name, layer in zip(self._layer_names,
                                                                                        self._layers()))
        self._check_shapes()
        self._fold_cache = FoldCache()

    def _layers(self) -> list[nn.Module]:
        """The block's layers as they are now (patching, SyncBatchNorm conversion and fold_bn swap them)."""
        block = self._modules["main"]
        return [block._modules[name] for name in self._layer_names]

    def _check_shapes(self) -> None:
        convs = [layer._modules["conv"] for layer in self._layers()]
        for conv in (convs[0], convs[-1]) if self.kind == "MBConv" else convs[-1:]:
            check_pointwise(conv)
        spatial = convs[-2]
        if self.kind != "FusedMBConv":
            check_depthwise(spatial)
        if self._residual and (convs[0].in_channels != convs[-1].out_channels or spatial.stride != (1, 1)):
            raise Unsupported("the identity shortcut needs a block that keeps the channels and the resolution")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = self._layers()
        norms = [live(layer, "norm") for layer in layers]
        if dropout_active(self, layers) or not all(foldable(norm) for norm in norms):
            y = self._modules["main"](x)  # the block's own forward, on its live (maybe patched) layers
            return y + x if self._residual else y
        convs = [layer._modules["conv"] for layer in layers]
        folded = [t for pair in self._fold_cache.fold(list(zip(convs, norms))) for t in pair]
        if self.kind != "MBConv":  # no expand: the op's first layer is absent
            folded, activations = [None, None, *folded], ("none", *self.activations)
        else:
            activations = self.activations
        spatial = convs[-2]
        return conv_block(x, *folded, stride=spatial.stride, padding=spatial.padding, groups=spatial.groups,
                          activations=activations, residual=x if self._residual else None, backend=self.backend)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, residual={self._residual}, activations={self.activations}, " + super().extra_repr()
