"""``FusedConvNormAct``: one drop-in for the conv → BatchNorm? → activation? containers of both EfficientViT
families — timm ``efficientvit_mit.ConvNormAct``, mit-han-lab ``ConvLayer`` (efficientsam), timm
``efficientvit_msra.ConvNorm`` and Cream ``Conv2d_BN`` — running as one ``evit::conv_bn_act`` call with the
BatchNorm folded in whenever the BatchNorm normalises with its running statistics.

``FusedResidualConvNorm``: the residual depthwise conv of EfficientViT-M blocks (timm ``ResidualDrop(ConvNorm)``,
Cream ``Residual(Conv2d_BN)``), the residual added in the same call."""

from __future__ import annotations

import torch
from torch import nn

from evit_kernels.nn._base import (
    FusedModule,
    FusedResidual,
    Unsupported,
    expect_match,
    residual_matches,
    role_names,
    unfused,
)
from evit_kernels.nn._fold import BatchNormFold, FoldCache, fold_bn_into, foldable
from evit_kernels.nn._match import MIT_HAN_LAB, TIMM_MIT, TIMM_MSRA, Match
from evit_kernels.ops.conv_bn_act import conv_bn_act

CONV_NORM = Match("timm", "ConvNorm", (TIMM_MSRA,), ("conv", "bn"))
CONV2D_BN = Match("Cream", "Conv2d_BN", None, ("c", "bn"))

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

    MATCHES = (Match("timm", "ConvNormAct", (TIMM_MIT,), ("dropout", "conv", "norm", "act")),
               Match("mit-han-lab", "ConvLayer", MIT_HAN_LAB, ("dropout", "conv", "norm", "act")),
               CONV_NORM, CONV2D_BN)
    CHILD_ROLES = {"dropout": ("dropout",), "conv": ("conv", "c"), "norm": ("norm", "bn"), "act": ("act",)}
    BN_FOLD = BatchNormFold("conv", "norm", fold_bn_into)

    def __init__(self, original: nn.Module, backend: str = "auto"):
        super().__init__(original, backend)
        self._bind_roles("conv + norm + activation")
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

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The original's output, plus ``residual`` when given (added in the same op call on the folded path)."""
        dropout, conv, norm, act = (self._child(role) for role in self.CHILD_ROLES)
        if dropout is not None:
            x = dropout(x)
        if not foldable(norm):
            x = norm(conv(x))
            x = x if act is None else act(x)
            return x if residual is None else x + residual
        (weight, bias), = self._fold_cache.fold([(conv, norm)])
        return conv_bn_act(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups,
                           self.activation, residual=residual, backend=self.backend)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, {super().extra_repr()}"


def with_residual(layer: nn.Module, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """``layer(x) + residual`` (``layer(x)`` when ``residual`` is None): in the layer's own op call when it is a
    :class:`FusedConvNormAct`, so the sum is written once; else the add after it."""
    if residual is None:
        return layer(x)
    if isinstance(layer, FusedConvNormAct):
        return layer(x, residual=residual)
    return layer(x) + residual


def conv_and_norm(module: nn.Module) -> tuple[nn.Conv2d, nn.Module]:
    """The live conv and BatchNorm of a ConvNorm / Conv2d_BN, patched into a FusedConvNormAct or not."""
    names = role_names(FusedConvNormAct.CHILD_ROLES, module)
    return module._modules[names["conv"]], module._modules[names["norm"]]


def check_conv_norm(module: nn.Module | None, role: str) -> tuple[nn.Conv2d, nn.Module]:
    """The (conv, BatchNorm) of a ConvNorm / Conv2d_BN, after refusing anything else (role names it in errors)."""
    match = expect_match(unfused(module), (CONV_NORM, CONV2D_BN), f"{role} is", "a ConvNorm / Conv2d_BN")
    names = set(module._modules)
    if names != set(match.attributes):
        raise Unsupported(f"{role} has children {sorted(names)}, expected a conv and a bn")
    conv, norm = conv_and_norm(module)
    if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise Unsupported(f"{role}'s conv {conv!r} is not a plain, explicitly zero-padded nn.Conv2d")
    if not isinstance(norm, (nn.BatchNorm2d, nn.SyncBatchNorm, nn.Identity)):  # Identity: after fold_bn
        raise Unsupported(f"{role}'s norm {type(norm).__qualname__} is not a BatchNorm2d")
    return conv, norm


class FusedResidualConvNorm(FusedResidual):
    """Drop-in for ``x + m(x)`` where ``m`` is a ConvNorm / Conv2d_BN that keeps the shape (the depthwise 3×3 of
    EfficientViT-M blocks).

    BatchNorm on running statistics and no active stochastic depth (eval, or ``drop`` 0): one op call with the
    folded weights (cached until a parameter, buffer or ``eps`` changes) and ``residual=x``. Otherwise the
    original's own forward. ``m`` may itself be patched into ``FusedConvNormAct``.
    """

    MATCHES = residual_matches(CONV_NORM, CONV2D_BN)

    def __init__(self, original: nn.Module, backend: str = "auto"):
        super().__init__(original, backend)
        if set(self._modules) != {"m"}:
            raise Unsupported(f"has children {sorted(self._modules)}, expected the residual branch m alone")
        conv, _ = check_conv_norm(self._modules["m"], "m")
        keeps_shape = all(k % 2 == 1 and p == d * (k // 2) for k, p, d in zip(conv.kernel_size, conv.padding,
                                                                                conv.dilation))
        if conv.in_channels != conv.out_channels or conv.stride != (1, 1) or not keeps_shape:
            raise Unsupported(f"m's conv {conv!r} does not keep the input's shape, so x + m(x) is not defined")
        self._fold_cache = FoldCache()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, norm = conv_and_norm(self._modules["m"])
        if self._stochastic_depth_active() or not foldable(norm):
            return self._run_original(x)
        (weight, bias), = self._fold_cache.fold([(conv, norm)])
        return conv_bn_act(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups, "none",
                           residual=x, backend=self.backend)
