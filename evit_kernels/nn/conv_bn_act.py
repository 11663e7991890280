"""``FusedConvNormAct``: one drop-in for the conv → BatchNorm? → activation? containers of both EfficientViT
families — timm ``efficientvit_mit.ConvNormAct``, mit-han-lab ``ConvLayer`` (efficientsam), timm
``efficientvit_msra.ConvNorm`` and Cream ``Conv2d_BN`` — running as one ``evit::conv_bn_act`` call with the
BatchNorm folded in whenever the BatchNorm normalises with its running statistics."""

from __future__ import annotations

import torch
from torch import nn

from evit_kernels.nn._base import FusedModule, Unsupported
from evit_kernels.nn._fold import FoldCache, fold_bn_into, uses_running_stats
from evit_kernels.ops.conv_bn_act import conv_bn_act

# Role → the child names the four containers use for it, in the order the originals apply them.
_CHILD_NAMES = {"dropout": ("dropout",), "conv": ("conv", "c"), "norm": ("norm", "bn"), "act": ("act",)}

_ACTIVATION_NAMES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish", nn.SiLU: "silu"}
_GELU_NAMES = {"none": "gelu", "tanh": "gelu_tanh"}
# timm's own GELU classes (timm EfficientViT-L builds its blocks with GELUTanh), named rather than imported so
# that timm stays optional.
_TIMM_ACTIVATION_NAMES = {("timm.layers.activations", "GELU"): "gelu",
                          ("timm.layers.activations", "GELUTanh"): "gelu_tanh"}


def activation_name(module: nn.Module | None) -> str:
    """The ``evit::conv_bn_act`` activation computing what ``module`` does (None and nn.Identity: "none").

    Classes match exactly: a subclass may compute something else. Raises :class:`Unsupported` otherwise.
    """
    if module is None or type(module) is nn.Identity:
        return "none"
    if type(module) is nn.GELU and module.approximate in _GELU_NAMES:
        return _GELU_NAMES[module.approximate]
    name = _ACTIVATION_NAMES.get(type(module)) or _TIMM_ACTIVATION_NAMES.get(
        (type(module).__module__, type(module).__qualname__))
    if name is None:
        raise Unsupported(f"activation {module!r} is not one of nn.Identity, nn.ReLU, nn.ReLU6, nn.Hardswish, "
                          "nn.GELU, nn.SiLU or timm's GELU / GELUTanh")
    return name


class FusedConvNormAct(FusedModule):
    """Drop-in for a conv (+ BatchNorm2d) (+ activation) container; see the module docstring for which.

    Eval with a BatchNorm on running statistics, or no BatchNorm: dropout (as the original, an identity in eval)
    then one op call with the BatchNorm folded into the conv (cached until a parameter, buffer or ``bn.eps``
    changes). A BatchNorm on batch statistics (training, or ``track_running_stats=False``): the original's
    children in the original's order, so batch statistics and running-stat updates are exactly the original's.
    """

    def __init__(self, original: nn.Module, backend: str = "auto"):
        super().__init__(original, backend)
        self._bind_roles(_CHILD_NAMES, "conv + norm + activation")
        conv = self._child("conv")
        if type(conv) is not nn.Conv2d:
            raise Unsupported(f"expected a plain nn.Conv2d child, got {conv!r}")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise Unsupported(f"conv padding {conv.padding!r} with padding_mode {conv.padding_mode!r}: only "
                              "explicit zero padding is supported")
        norm = self._child("norm")
        if norm is not None and not isinstance(norm, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            raise Unsupported(f"norm {type(norm).__qualname__} is not a BatchNorm2d, so it cannot fold into the conv")
        self.activation = activation_name(self._child("act"))
        self._fold_cache = FoldCache()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dropout, conv, norm, act = (self._child(role) for role in _CHILD_NAMES)
        if dropout is not None:
            x = dropout(x)
        if norm is None:
            weight, bias = conv.weight, conv.bias
        elif uses_running_stats(norm):
            weight, bias = self._fold_cache.get(
                lambda: fold_bn_into(conv.weight, conv.bias, norm),
                [conv.weight, conv.bias, norm.weight, norm.bias, norm.running_mean, norm.running_var],
                key=(norm.eps,))
        else:
            x = norm(conv(x))
            return x if act is None else act(x)
        return conv_bn_act(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups,
                           self.activation, backend=self.backend)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, {super().extra_repr()}"
