"""``FusedGLUMBConv``: drop-in for ``GLUMBConv``, the gated MBConv of diffusers (the Sana transformers' feed-forward,
the EfficientViT blocks of ``AutoencoderDC``) and of mit-han-lab (efficientsam), running expand → depthwise → GLU
gate → projection as one ``evit::conv_block`` call in GLU mode with every BatchNorm folded, then, where diffusers'
has them, its channel RMSNorm and residual as one ``evit::rms_norm`` call (docs/ops.md, "conv_block")."""

from __future__ import annotations

import torch
from torch import nn

from evit_kernels.nn._base import FusedModule, Unsupported, expect_match, unfused
from evit_kernels.nn._fold import FoldCache, foldable
from evit_kernels.nn._match import DIFFUSERS_SANA, MIT_HAN_LAB, Match, recognise
from evit_kernels.nn.conv_block import (
    check_conv_layer,
    check_depthwise,
    check_plain_conv,
    check_pointwise,
    dropout_active,
    live,
)
from evit_kernels.nn.conv_bn_act import activation_name
from evit_kernels.nn.rms_norm import DIFFUSERS_RMS_NORM, computes_as_diffusers
from evit_kernels.ops.conv_block import conv_block
from evit_kernels.ops.rms_norm import rms_norm

DIFFUSERS_GLUMBCONV = Match("diffusers", "GLUMBConv", (DIFFUSERS_SANA,),
                            ("conv_inverted", "conv_depth", "conv_point", "nonlinearity", "norm", "norm_type",
                             "residual_connection"))
MIT_HAN_LAB_GLUMBCONV = Match("mit-han-lab", "GLUMBConv", MIT_HAN_LAB,
                              ("inverted_conv", "depth_conv", "point_conv", "glu_act"))
_DIFFUSERS_ATTRIBUTES = ("norm_type", "residual_connection", "norm")
"""The plain attributes diffusers' forward reads (``norm`` is one when ``norm_type`` is not "rms_norm")."""


class FusedGLUMBConv(FusedModule):
    """Drop-in for diffusers' and mit-han-lab's ``GLUMBConv``.

    diffusers: plain convs (biases on the expand and depthwise), one ``nonlinearity`` (SiLU) after the expand and on
    the gate, then optionally RMSNorm over the channels and the residual. mit-han-lab: conv + norm + activation
    layers, ``glu_act`` on the gate; its norms must be BatchNorms (its default ``ln2d`` projection norm is refused).

    With every BatchNorm on running statistics (or absent), no active dropout, plain ``nn.Conv2d`` layers (no
    adapter wrapped around them) and, for the RMSNorm, the tensors :func:`computes_as_diffusers` takes: the op
    calls, training included (the gradients are the reference's). Otherwise the original's own forward runs on
    the live children.
    """

    MATCHES = (DIFFUSERS_GLUMBCONV, MIT_HAN_LAB_GLUMBCONV)

    def __init__(self, original: nn.Module, backend: str = "auto"):
        super().__init__(original, backend)
        for name in _DIFFUSERS_ATTRIBUTES:
            if name in original.__dict__:
                self.__dict__[name] = original.__dict__[name]
        match = expect_match(original, self.MATCHES, "the module is", "a GLUMBConv")
        self._diffusers = match is DIFFUSERS_GLUMBCONV
        if self._diffusers:
            self._layer_names = ("conv_inverted", "conv_depth", "conv_point")
            self._check_children({*self._layer_names, "nonlinearity", "norm"})
            for name, conv in zip(self._layer_names, self._layers()):
                check_plain_conv(name, conv)
            self.gate = activation_name(original.nonlinearity)
            self.activations = (self.gate, "none", "none")
            self._has_norm = original.norm_type == "rms_norm"
            self._residual = bool(original.residual_connection)
            if self._has_norm:
                self._check_rms_norm(unfused(original.norm))
        else:
            self._layer_names = ("inverted_conv", "depth_conv", "point_conv")
            self._check_children({*self._layer_names, "glu_act"})
            self.activations = tuple(check_conv_layer(name, layer) for name, layer in zip(self._layer_names,
                                                                                            self._layers()))
            if original.glu_act is None:
                raise Unsupported("glu_act is None: the original's forward cannot gate")
            self.gate = activation_name(original.glu_act)
            self._has_norm = self._residual = False
        self._check_shapes()
        self._fold_cache = FoldCache()

    def _check_children(self, expected: set[str]) -> None:
        unknown = set(self._modules) - expected
        if unknown:
            raise Unsupported(f"GLUMBConv has children {sorted(unknown)} besides {sorted(expected)}")

    @staticmethod
    def _check_rms_norm(norm: nn.Module) -> None:
        match, _ = recognise(norm, (DIFFUSERS_RMS_NORM,))
        if match is None or len(norm.dim) != 1:
            raise Unsupported(f"norm {norm!r} is not diffusers' RMSNorm over the channels")

    def _check_shapes(self) -> None:
        expand, depth, project = self._convs()
        check_pointwise(expand)
        check_depthwise(depth)
        check_pointwise(project)
        if depth.out_channels != 2 * project.in_channels:
            raise Unsupported(f"the depthwise conv's {depth.out_channels} channels are not twice the projection's "
                              f"{project.in_channels} inputs")
        if self._residual and (expand.in_channels != project.out_channels or depth.stride != (1, 1)):
            raise Unsupported("the residual needs a block that keeps the channels and the resolution")

    def _layers(self) -> list[nn.Module]:
        """The three layers as they are now (patching and SyncBatchNorm conversion swap them)."""
        return [self._modules[name] for name in self._layer_names]

    def _convs(self) -> list[nn.Module]:
        layers = self._layers()
        return layers if self._diffusers else [layer._modules["conv"] for layer in layers]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers, convs = self._layers(), self._convs()
        norms = [None] * 3 if self._diffusers else [live(layer, "norm") for layer in layers]
        channel_norm = self._modules["norm"] if self._has_norm else None
        if (dropout_active(self, layers) or not all(foldable(norm) for norm in norms)
                or any(type(conv) is not nn.Conv2d for conv in convs)
                or (channel_norm is not None and not computes_as_diffusers(x, channel_norm.weight, channel_norm.bias))):
            return type(self.original).forward(self, x)
        folded = [t for pair in self._fold_cache.fold(list(zip(convs, norms))) for t in pair]
        depth = convs[1]
        residual = x if self._residual else None
        y = conv_block(x, *folded, stride=depth.stride, padding=depth.padding, groups=depth.groups,
                       activations=self.activations, gate=self.gate,
                       residual=residual if channel_norm is None else None, backend=self.backend)
        if channel_norm is None:
            return y
        return rms_norm(y.movedim(1, -1), channel_norm.weight, channel_norm.bias, channel_norm.eps,
                        residual=None if residual is None else residual.movedim(1, -1),
                        backend=self.backend).movedim(-1, 1)

    def extra_repr(self) -> str:
        return (f"activations={self.activations}, gate={self.gate!r}, norm={self._has_norm}, "
                f"residual={self._residual}, " + super().extra_repr())
