"""``evit::conv_bn_act``: ``act(conv2d(x, weight, bias)) + residual``, the inference form of a conv + BatchNorm +
activation block once the BatchNorm is folded into ``weight`` and ``bias`` (docs/ops.md, "conv_bn_act")."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from evit_kernels import dispatch
from evit_kernels.ops._library import AddsResidual, RoundsInput, define_op

if TYPE_CHECKING:
    from evit_kernels.ops.conv_block import ConvBlockArgs

_ACTIVATION_FUNCTIONS = {
    "none": lambda y: y,
    "relu": F.relu,
    "relu6": F.relu6,
    "hardswish": F.hardswish,
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "silu": F.silu,
}
ACTIVATIONS = tuple(_ACTIVATION_FUNCTIONS)
"""The activation names the op accepts ("gelu" is the erf form, "gelu_tanh" the tanh approximation)."""


def output_memory_format(x: Tensor) -> torch.memory_format:
    """The layout of the op's output: channels-last when ``x`` is (and is not also plainly contiguous, as a
    1×1 map is), else contiguous. One rule shared by every backend and the fake implementation."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def conv_output_shape(x: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int],
                      dilation: Sequence[int]) -> list[int]:
    """``(B, C_out, H_out, W_out)`` of ``conv2d(x, weight)`` with these (height, width) pairs."""
    spatial = [(size + 2 * p - d * (k - 1) - 1) // s + 1
               for size, k, s, p, d in zip(x.shape[2:], weight.shape[2:], stride, padding, dilation, strict=True)]
    return [x.shape[0], weight.shape[0], *spatial]


@dataclass(frozen=True)
class ConvBnActArgs(AddsResidual, RoundsInput):
    """The arguments of ``evit::conv_bn_act`` (see :func:`conv_bn_act`), pairs as [height, width] lists."""

    op: ClassVar[str] = "conv_bn_act"
    weight_field: ClassVar[str] = "weight"
    x: Tensor
    weight: Tensor
    bias: Tensor | None
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int
    activation: str
    residual: Tensor | None = None

    def output_shape(self) -> list[int]:
        return conv_output_shape(self.x, self.weight, self.stride, self.padding, self.dilation)

    def output_layout(self) -> torch.memory_format:
        return output_memory_format(self.x)


def conv_bn_act_reference(a: ConvBnActArgs) -> Tensor:
    """Eager PyTorch: ``act(conv2d(x, weight, bias)) + residual``, laid out as :func:`output_memory_format`."""
    y = _ACTIVATION_FUNCTIONS[a.activation](F.conv2d(a.rounded_input(), a.weight, a.bias, a.stride, a.padding,
                                                      a.dilation, a.groups))
    if a.residual is not None:
        y = y + a.residual
    return y.contiguous(memory_format=a.output_layout())


define_op(ConvBnActArgs, conv_bn_act_reference)


def conv_bn_act(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: int | Sequence[int] = 1,
                padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1, groups: int = 1,
                activation: str = "none", residual: Tensor | None = None, backend: str = "auto") -> Tensor:
    """``act(conv2d(x, weight, bias, stride, padding, dilation, groups)) + residual``.

    ``x`` is (B, C_in, H, W) in NCHW or channels-last layout (the output keeps it); ``weight`` is
    (C_out, C_in / groups, kH, kW); ``activation`` is one of :data:`ACTIVATIONS`; ``residual``, when given, has
    the output's shape and is added after the activation. Zero padding only. An fp32 residual with fp16/bf16
    inputs, and under autocast an fp32 ``x``, are taken as they are (docs/ops.md, "Inputs wider than the compute
    dtype").
    """
    if activation not in _ACTIVATION_FUNCTIONS:
        raise ValueError(f"conv_bn_act: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    stride, padding, dilation = (_pair(name, value, minimum) for name, value, minimum in
                                 (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)))
    args = ConvBnActArgs(x, weight, bias, stride, padding, dilation, groups, activation, residual)
    _check_shapes(args)
    return dispatch.run(args.cast_and_checked(), backend)


def _pair(name: str, value: int | Sequence[int], minimum: int) -> list[int]:
    pair = [value, value] if isinstance(value, int) else list(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= minimum for v in pair):
        raise ValueError(f"conv_bn_act: {name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return pair


def _check_shapes(a: ConvBnActArgs) -> None:
    x, weight, bias, groups = a.x, a.weight, a.bias, a.groups
    if x.dim() != 4:
        raise ValueError(f"conv_bn_act: x must be (B, C, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"conv_bn_act: weight must be (C_out, C_in / groups, kH, kW), got {tuple(weight.shape)}")
    out_channels = weight.shape[0]
    if groups < 1 or out_channels % groups:
        raise ValueError(f"conv_bn_act: groups={groups} must be >= 1 and divide the {out_channels} output channels")
    if x.shape[1] != weight.shape[1] * groups:
        raise ValueError(f"conv_bn_act: x has {x.shape[1]} channels but weight {tuple(weight.shape)} with "
                         f"groups={groups} expects {weight.shape[1] * groups}")
    check_biases_and_output(a, weight, f"dilation {a.dilation}, padding {a.padding}", bias=(bias, out_channels))


def check_biases_and_output(a: ConvBnActArgs | ConvBlockArgs, spatial_weight: Tensor, geometry: str,
                            **biases: tuple[Tensor | None, int]) -> None:
    """Raise a clear error unless each named bias (tensor, size) has shape (size,), the spatial conv of
    ``spatial_weight`` (with ``geometry`` in words) leaves a non-empty map, and ``a.residual`` has the output's
    shape. Shared by the ops made of convolutions."""
    for name, (bias, size) in biases.items():
        if bias is not None and tuple(bias.shape) != (size,):
            raise ValueError(f"{a.op}: {name} must have shape ({size},), got {tuple(bias.shape)}")
    shape = a.output_shape()
    if min(shape[2:]) <= 0:
        raise ValueError(f"{a.op}: a {tuple(spatial_weight.shape[2:])} kernel ({geometry}) does not fit the "
                         f"{tuple(a.x.shape[2:])} input")
    if a.residual is not None and list(a.residual.shape) != shape:
        raise ValueError(f"{a.op}: residual has shape {tuple(a.residual.shape)} but the output is {tuple(shape)}")


_DEPTHWISE_SIZES = (3, 5, 7)


def kernel_kind(a: ConvBnActArgs) -> str | None:
    """Which kernel computes this conv: "depthwise" (Triton or CUDA); "rows" (groups 1, 3×3, padding 1, stride 1 or
    2, either at most ``ROWS_PAIRS // 3`` input channels (an image) or an input with contiguous rows (NCHW) and
    output rows of at least ``ROWS_MIN_OUT_WIDTH``; Triton); "dense" (groups 1: a 1×1 with stride 1 and no padding,
    or a 3×3 with at least :data:`DENSE_MIN_TAP_CHANNELS` input channels; Triton) or None. Where both take the conv,
    "rows", but "dense" outside :func:`on_chip_gathers` (the row-staged kernel gathers its taps on chip)."""
    from evit_kernels.triton._common import on_chip_gathers
    from evit_kernels.triton.conv_bn_act import (
        DENSE_KERNEL_SIZES,
        DENSE_MIN_TAP_CHANNELS,
        ROWS_MIN_OUT_WIDTH,
        ROWS_PAIRS,
    )

    out_channels, in_per_group, kernel_h, kernel_w = a.weight.shape
    rows = (a.groups == 1 and (kernel_h, kernel_w) == (3, 3) and a.padding == [1, 1] and a.stride in ([1, 1], [2, 2])
            and (3 * in_per_group <= ROWS_PAIRS
                 or (a.x.stride(3) == 1 and a.output_shape()[3] >= ROWS_MIN_OUT_WIDTH)))
    dense = a.groups == 1 and kernel_h == kernel_w and kernel_h in DENSE_KERNEL_SIZES and (
        (kernel_h > 1 and in_per_group >= DENSE_MIN_TAP_CHANNELS) or (a.stride == [1, 1] and a.padding == [0, 0]))
    if rows and (on_chip_gathers() or not dense):
        return "rows"
    if dense:
        return "dense"
    if (a.groups == a.x.shape[1] == out_channels and in_per_group == 1 and kernel_h == kernel_w
            and kernel_h in _DEPTHWISE_SIZES and all(s in (1, 2) for s in a.stride)):
        return "depthwise"
    return None


def triton_forward_into(a: ConvBnActArgs, out: Tensor) -> Tensor:
    """The Triton kernel of ``a``'s kind, writing ``out`` (``a``'s output shape and dtype, any strides)."""
    from evit_kernels.triton import conv_bn_act as kernels

    kind = kernel_kind(a)
    if kind == "dense":  # its products round an fp32 x to the weights' dtype as they load it (RoundsInput)
        return kernels.dense(a, out)
    rounded = replace(a, x=a.rounded_input())
    return (kernels.depthwise if kind == "depthwise" else kernels.rows)(rounded, out)


def _triton_forward(a: ConvBnActArgs) -> Tensor:
    return triton_forward_into(a, a.new_output())


def _triton_reasons(a: ConvBnActArgs) -> list[str]:
    reasons = []
    if a.dilation != [1, 1]:
        reasons.append(f"dilation {a.dilation} (the Triton kernels take dilation 1)")
    if kernel_kind(a) is None:
        reasons.append(f"a conv with weight {tuple(a.weight.shape)}, groups={a.groups}, stride={a.stride}, "
                       f"padding={a.padding} (the Triton kernels take a depthwise 3×3, 5×5 or 7×7 conv with "
                       f"stride 1 or 2, a 1×1 conv with groups 1, stride 1 and padding 0, a 3×3 conv with "
                       f"groups 1 and at least 16 input channels, or a 3×3 conv with groups 1, stride 1 or 2, "
                       f"padding 1 and at most 5 input channels)")
    return reasons


dispatch.register("conv_bn_act", dispatch.Backend("triton", _triton_forward, _triton_reasons))


def _cuda_forward(a: ConvBnActArgs) -> Tensor:
    """The depthwise conv in one launch, its input tile and halo staged in shared memory
    (csrc/conv_bn_act_cuda.cu); the output is laid out as :func:`output_memory_format`."""
    return torch.ops.evit.depthwise_conv_cuda(a.x, a.weight, a.bias, a.stride, a.padding, a.activation, a.residual)


def _cuda_reasons(a: ConvBnActArgs) -> list[str]:
    # No refusal when gradients are needed: the op's backward is the reference's VJP whichever backend ran forward.
    # Any layout is read through its strides; offsets are 64-bit.
    reasons = []
    if a.dilation != [1, 1]:
        reasons.append(f"dilation {a.dilation} (the CUDA kernel takes dilation 1)")
    if kernel_kind(a) != "depthwise":
        reasons.append(f"a conv with weight {tuple(a.weight.shape)}, groups={a.groups}, stride={a.stride} (the CUDA "
                       f"kernel takes a depthwise 3×3, 5×5 or 7×7 conv with stride 1 or 2; 1×1 and other convs run "
                       f"on the triton or torch backend)")
    wider = [f"a {t.dtype} {name}" for name, t in (("input", a.x), ("residual", a.residual))
             if t is not None and t.dtype != a.weight.dtype]
    if wider:
        reasons.append(f"{' and '.join(wider)} with {a.weight.dtype} weights (the CUDA kernel reads every tensor in "
                       "one dtype)")
    if max(*a.x.shape[2:], *a.padding) >= 2**28:
        reasons.append("a map or padding of 2^28 pixels or more (the CUDA kernel's pixel coordinates are 32-bit)")
    return reasons


dispatch.register("conv_bn_act", dispatch.Backend("cuda", _cuda_forward, _cuda_reasons, int32_offsets=False))
