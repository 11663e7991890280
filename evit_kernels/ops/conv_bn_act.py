"""``evit::conv_bn_act``: ``act(conv2d(x, weight, bias)) + residual``, the inference form of a conv + BatchNorm +
activation block once the BatchNorm is folded into ``weight`` and ``bias`` (docs/ops.md, "conv_bn_act")."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from evit_kernels import dispatch
from evit_kernels.ops._library import autocast_inputs, check_floating_same_dtype, register_reference_autograd

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


def conv_bn_act_reference(x: Tensor, weight: Tensor, bias: Tensor | None, stride: Sequence[int],
                          padding: Sequence[int], dilation: Sequence[int], groups: int, activation: str,
                          residual: Tensor | None = None) -> Tensor:
    """Eager PyTorch: ``act(conv2d(x, weight, bias)) + residual``, laid out as :func:`output_memory_format`."""
    y = _ACTIVATION_FUNCTIONS[activation](F.conv2d(x, weight, bias, stride, padding, dilation, groups))
    if residual is not None:
        y = y + residual
    return y.contiguous(memory_format=output_memory_format(x))


@torch.library.custom_op("evit::conv_bn_act", mutates_args=())
def _conv_bn_act_op(x: Tensor, weight: Tensor, bias: Tensor | None, stride: list[int], padding: list[int],
                    dilation: list[int], groups: int, activation: str, residual: Tensor | None,
                    backend: str) -> Tensor:
    return dispatch.get("conv_bn_act", backend).forward(
        x, weight, bias, stride, padding, dilation, groups, activation, residual)


@torch.library.register_fake("evit::conv_bn_act")
def _conv_bn_act_fake(x, weight, bias, stride, padding, dilation, groups, activation, residual, backend):
    shape = conv_output_shape(x, weight, stride, padding, dilation)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))


register_reference_autograd("evit::conv_bn_act", conv_bn_act_reference)
dispatch.register("conv_bn_act", dispatch.Backend("torch", conv_bn_act_reference))


def conv_bn_act(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: int | Sequence[int] = 1,
                padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1, groups: int = 1,
                activation: str = "none", residual: Tensor | None = None, backend: str = "auto") -> Tensor:
    """``act(conv2d(x, weight, bias, stride, padding, dilation, groups)) + residual``.

    ``x`` is (B, C_in, H, W) in NCHW or channels-last layout (the output keeps it); ``weight`` is
    (C_out, C_in / groups, kH, kW); ``activation`` is one of :data:`ACTIVATIONS`; ``residual``, when given, has
    the output's shape and is added after the activation. Zero padding only.
    """
    if activation not in _ACTIVATION_FUNCTIONS:
        raise ValueError(f"conv_bn_act: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    stride, padding, dilation = (_pair(name, value, minimum) for name, value, minimum in
                                 (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)))
    _check_shapes(x, weight, bias, stride, padding, dilation, groups, residual)
    x, weight, bias, residual = autocast_inputs(x, weight, bias, residual)
    check_floating_same_dtype("conv_bn_act", x, weight=weight, bias=bias, residual=residual)
    args = (x, weight, bias, stride, padding, dilation, groups, activation, residual)
    chosen = dispatch.choose("conv_bn_act", *args, backend=backend)
    return dispatch.call(torch.ops.evit.conv_bn_act, chosen, *args)


def _pair(name: str, value: int | Sequence[int], minimum: int) -> list[int]:
    pair = [value, value] if isinstance(value, int) else list(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= minimum for v in pair):
        raise ValueError(f"conv_bn_act: {name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return pair


def _check_shapes(x: Tensor, weight: Tensor, bias: Tensor | None, stride: list[int], padding: list[int],
                  dilation: list[int], groups: int, residual: Tensor | None) -> None:
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
    if bias is not None and tuple(bias.shape) != (out_channels,):
        raise ValueError(f"conv_bn_act: bias must have shape ({out_channels},), got {tuple(bias.shape)}")
    shape = conv_output_shape(x, weight, stride, padding, dilation)
    if min(shape[2:]) <= 0:
        raise ValueError(f"conv_bn_act: a {tuple(weight.shape[2:])} kernel (dilation {dilation}, padding {padding}) "
                         f"does not fit the {tuple(x.shape[2:])} input")
    if residual is not None and list(residual.shape) != shape:
        raise ValueError(f"conv_bn_act: residual has shape {tuple(residual.shape)} but the output is {tuple(shape)}")


_DEPTHWISE_SIZES = (3, 5, 7)


def _kernel_kind(x: Tensor, weight: Tensor, stride: list[int], padding: list[int], groups: int) -> str | None:
    """Which kernel computes this conv: "depthwise" (Triton or CUDA), "pointwise" (1×1, Triton) or None."""
    out_channels, in_per_group, kernel_h, kernel_w = weight.shape
    if groups == 1 and (kernel_h, kernel_w) == (1, 1) and list(stride) == [1, 1] and list(padding) == [0, 0]:
        return "pointwise"
    if (groups == x.shape[1] == out_channels and in_per_group == 1 and kernel_h == kernel_w
            and kernel_h in _DEPTHWISE_SIZES and all(s in (1, 2) for s in stride)):
        return "depthwise"
    return None


def _triton_forward(x: Tensor, weight: Tensor, bias: Tensor | None, stride: list[int], padding: list[int],
                    dilation: list[int], groups: int, activation: str, residual: Tensor | None) -> Tensor:
    from evit_kernels.triton import conv_bn_act as kernels

    shape = conv_output_shape(x, weight, stride, padding, dilation)
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))
    if _kernel_kind(x, weight, stride, padding, groups) == "depthwise":
        return kernels.depthwise(x, weight, bias, stride, padding, activation, residual, out)
    return kernels.pointwise(x, weight, bias, activation, residual, out)


def _triton_reasons(x: Tensor, weight: Tensor, bias: Tensor | None, stride: list[int], padding: list[int],
                    dilation: list[int], groups: int, activation: str, residual: Tensor | None) -> list[str]:
    from evit_kernels.triton.conv_bn_act import fits_int32

    reasons = dispatch.kernel_reasons("triton", x)
    if list(dilation) != [1, 1]:
        reasons.append(f"dilation {list(dilation)} (the Triton kernels take dilation 1)")
    if _kernel_kind(x, weight, stride, padding, groups) is None:
        reasons.append(f"a conv with weight {tuple(weight.shape)}, groups={groups}, stride={list(stride)}, "
                       f"padding={list(padding)} (the Triton kernels take a depthwise 3×3, 5×5 or 7×7 conv with "
                       f"stride 1 or 2, or a 1×1 conv with groups 1, stride 1 and padding 0)")
    out_numel = math.prod(conv_output_shape(x, weight, stride, padding, dilation))
    if out_numel >= 2**31 or not all(fits_int32(t) for t in (x, weight, bias, residual) if t is not None):
        reasons.append("a tensor of 2^31 elements or more (the kernels index with 32 bits)")
    return reasons


dispatch.register("conv_bn_act", dispatch.Backend("triton", _triton_forward, _triton_reasons))


def _cuda_forward(x: Tensor, weight: Tensor, bias: Tensor | None, stride: list[int], padding: list[int],
                  dilation: list[int], groups: int, activation: str, residual: Tensor | None) -> Tensor:
    """The depthwise conv in one launch, its input tile and halo staged in shared memory
    (csrc/conv_bn_act_cuda.cu); the output is laid out as :func:`output_memory_format`."""
    return torch.ops.evit.depthwise_conv_cuda(x, weight, bias, stride, padding, activation, residual)


def _cuda_reasons(x: Tensor, weight: Tensor, bias: Tensor | None, stride: list[int], padding: list[int],
                  dilation: list[int], groups: int, activation: str, residual: Tensor | None) -> list[str]:
    # No refusal when gradients are needed: the op's backward is the reference's VJP whichever backend ran forward.
    # Any layout is read through its strides.
    reasons = dispatch.kernel_reasons("cuda", x)
    if list(dilation) != [1, 1]:
        reasons.append(f"dilation {list(dilation)} (the CUDA kernel takes dilation 1)")
    if _kernel_kind(x, weight, stride, padding, groups) != "depthwise":
        reasons.append(f"a conv with weight {tuple(weight.shape)}, groups={groups}, stride={list(stride)} (the CUDA "
                       f"kernel takes a depthwise 3×3, 5×5 or 7×7 conv with stride 1 or 2; 1×1 and other convs run "
                       f"on the triton or torch backend)")
    if max(*x.shape[2:], *padding) >= 2**28:
        reasons.append("a map or padding of 2^28 pixels or more (the CUDA kernel's pixel coordinates are 32-bit)")
    return reasons


dispatch.register("conv_bn_act", dispatch.Backend("cuda", _cuda_forward, _cuda_reasons))
