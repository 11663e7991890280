"""``evit::conv_block``: a whole EfficientViT conv block in its inference form, every BatchNorm folded:

    h   = act1(conv1x1(x, w1, b1))                 MBConv's expand (``w1`` None: DSConv, FusedMBConv)
    d   = act2(conv2d(h, w2, b2, stride, padding, groups))   depthwise (groups = width) or full (groups = 1)
    out = act3(conv1x1(d, w3, b3)) + residual

MBConv is expand → depthwise → project, DSConv depthwise → project, FusedMBConv full k×k → project
(docs/ops.md, "conv_block").
The Triton backend keeps ``h`` and ``d`` on chip (whole-block fusion) where its tiles hold the shape, and otherwise
runs the block layer by layer through ``evit::conv_bn_act``'s kernels (per-layer fusion), saying so once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from evit_kernels import dispatch
from evit_kernels.ops._library import autocast_inputs, check_floating_same_dtype, register_reference_autograd
from evit_kernels.ops.conv_bn_act import (
    ACTIVATIONS,
    _pair,
    conv_bn_act_reference,
    conv_output_shape,
    output_memory_format,
)

_ONE, _ZERO = [1, 1], [0, 0]


def _layers(x: Tensor, w1: Tensor | None, b1: Tensor | None, act1: str, w2: Tensor, b2: Tensor | None, act2: str,
            stride: list[int], padding: list[int], groups: int, w3: Tensor, b3: Tensor | None, act3: str,
            residual: Tensor | None) -> list[tuple]:
    """The block as ``conv_bn_act`` argument tuples, input first; each layer's input is the previous output."""
    layers = [] if w1 is None else [(w1, b1, _ONE, _ZERO, _ONE, 1, act1, None)]
    layers += [(w2, b2, stride, padding, _ONE, groups, act2, None), (w3, b3, _ONE, _ZERO, _ONE, 1, act3, residual)]
    return layers


def conv_block_reference(x: Tensor, w1: Tensor | None, b1: Tensor | None, act1: str, w2: Tensor,
                         b2: Tensor | None, act2: str, stride: list[int], padding: list[int], groups: int, w3: Tensor,
                         b3: Tensor | None, act3: str, residual: Tensor | None = None) -> Tensor:
    """Eager PyTorch, layer after layer; laid out as :func:`output_memory_format` of ``x``."""
    for layer in _layers(x, w1, b1, act1, w2, b2, act2, stride, padding, groups, w3, b3, act3, residual):
        x = conv_bn_act_reference(x, *layer)
    return x


def _output_shape(x: Tensor, w2: Tensor, stride: list[int], padding: list[int], w3: Tensor) -> list[int]:
    batch, _, out_height, out_width = conv_output_shape(x, w2, stride, padding, _ONE)
    return [batch, w3.shape[0], out_height, out_width]


@torch.library.custom_op("evit::conv_block", mutates_args=())
def _conv_block_op(x: Tensor, w1: Tensor | None, b1: Tensor | None, act1: str, w2: Tensor, b2: Tensor | None,
                   act2: str, stride: list[int], padding: list[int], groups: int, w3: Tensor, b3: Tensor | None,
                   act3: str, residual: Tensor | None, backend: str) -> Tensor:
    return dispatch.get("conv_block", backend).forward(
        x, w1, b1, act1, w2, b2, act2, stride, padding, groups, w3, b3, act3, residual)


@torch.library.register_fake("evit::conv_block")
def _conv_block_fake(x, w1, b1, act1, w2, b2, act2, stride, padding, groups, w3, b3, act3, residual, backend):
    return torch.empty(_output_shape(x, w2, stride, padding, w3), dtype=x.dtype, device=x.device,
                       memory_format=output_memory_format(x))


register_reference_autograd("evit::conv_block", conv_block_reference)
dispatch.register("conv_block", dispatch.Backend("torch", conv_block_reference))


def conv_block(x: Tensor, w1: Tensor | None, b1: Tensor | None, w2: Tensor, b2: Tensor | None, w3: Tensor,
               b3: Tensor | None, *, stride: int | Sequence[int] = 1, padding: int | Sequence[int] | None = None,
               groups: int | None = None, activations: Sequence[str] = ("none", "none", "none"),
               residual: Tensor | None = None, backend: str = "auto") -> Tensor:
    """One EfficientViT conv block (see the module docstring), BatchNorms folded into the weights.

    ``x`` is (B, C_in, H, W), NCHW or channels-last (the output keeps it). ``w1`` (hidden, C_in, 1, 1) or None;
    ``w2`` (mid, width / groups, k, k) where width is hidden, or C_in without ``w1``; ``w3`` (C_out, mid, 1, 1).
    ``padding`` defaults to k // 2 and ``groups`` to the width (depthwise). ``activations`` names the three
    activations (one of :data:`ACTIVATIONS` each; the first is ignored without ``w1``). ``residual``, when given,
    has the output's shape and is added last.
    """
    act1, act2, act3 = activations
    for name in activations:
        if name not in ACTIVATIONS:
            raise ValueError(f"conv_block: unknown activation {name!r}; expected one of {ACTIVATIONS}")
    width = x.shape[1] if w1 is None else w1.shape[0]
    groups = width if groups is None else groups
    stride = _pair("stride", stride, 1)
    padding = _pair("padding", [w2.shape[2] // 2, w2.shape[3] // 2] if padding is None else padding, 0)
    _check_shapes(x, w1, b1, w2, b2, stride, padding, groups, w3, b3, residual)
    x, w1, b1, w2, b2, w3, b3, residual = autocast_inputs(x, w1, b1, w2, b2, w3, b3, residual)
    check_floating_same_dtype("conv_block", x, w1=w1, b1=b1, w2=w2, b2=b2, w3=w3, b3=b3, residual=residual)
    args = (x, w1, b1, act1, w2, b2, act2, stride, padding, groups, w3, b3, act3, residual)
    chosen = dispatch.choose("conv_block", *args, backend=backend)
    return dispatch.call(torch.ops.evit.conv_block, chosen, *args)


def _check_shapes(x: Tensor, w1: Tensor | None, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
                  stride: list[int], padding: list[int], groups: int, w3: Tensor, b3: Tensor | None,
                  residual: Tensor | None) -> None:
    if x.dim() != 4:
        raise ValueError(f"conv_block: x must be (B, C, H, W), got shape {tuple(x.shape)}")
    width = x.shape[1]
    if w1 is not None:
        if w1.dim() != 4 or tuple(w1.shape[1:]) != (width, 1, 1):
            raise ValueError(f"conv_block: w1 must be (hidden, {width}, 1, 1) for x with {width} channels, "
                             f"got {tuple(w1.shape)}")
        width = w1.shape[0]
    if w2.dim() != 4 or groups < 1 or width % groups or w2.shape[0] % groups or w2.shape[1] * groups != width:
        raise ValueError(f"conv_block: w2 {tuple(w2.shape)} with groups={groups} does not take the {width} "
                         "channels it receives")
    mid = w2.shape[0]
    if w3.dim() != 4 or tuple(w3.shape[1:]) != (mid, 1, 1):
        raise ValueError(f"conv_block: w3 must be (C_out, {mid}, 1, 1), got {tuple(w3.shape)}")
    for name, bias, size in (("b1", b1, width), ("b2", b2, mid), ("b3", b3, w3.shape[0])):
        if bias is not None and tuple(bias.shape) != (size,):
            raise ValueError(f"conv_block: {name} must have shape ({size},), got {tuple(bias.shape)}")
    shape = _output_shape(x, w2, stride, padding, w3)
    if min(shape[2:]) <= 0:
        raise ValueError(f"conv_block: a {tuple(w2.shape[2:])} kernel (padding {padding}) does not fit the "
                         f"{tuple(x.shape[2:])} input")
    if residual is not None and list(residual.shape) != shape:
        raise ValueError(f"conv_block: residual has shape {tuple(residual.shape)} but the output is {tuple(shape)}")


# --- Triton ----------------------------------------------------------------------------------------------------


def _spatial_kind(w1: Tensor | None, w2: Tensor, stride: list[int], groups: int) -> str | None:
    """Which whole-block kernel computes this block ("expand_depthwise", "depthwise", "full"), or None."""
    from evit_kernels.triton.conv_block import KERNEL_SIZES

    k_h, k_w = w2.shape[2:]
    if k_h != k_w or k_h not in KERNEL_SIZES or stride[0] != stride[1] or stride[0] not in (1, 2):
        return None
    depthwise = groups == w2.shape[0] and w2.shape[1] == 1
    if depthwise:
        return "depthwise" if w1 is None else "expand_depthwise"
    return "full" if groups == 1 and w1 is None else None


def _whole_block_config(x, w1, w2, stride, padding, groups, w3) -> tuple[str, dict] | tuple[None, str]:
    """(kind, tile config) for the whole-block kernel, or (None, why it does not take this block)."""
    from evit_kernels.triton.conv_block import tile_config

    kind = _spatial_kind(w1, w2, stride, groups)
    if kind is None:
        return None, (f"the spatial conv {tuple(w2.shape)} (groups={groups}, stride={stride}) after "
                      f"{'an expand' if w1 is not None else 'no expand'} is not a depthwise or full square 3×3, 5×5 "
                      "or 7×7 conv with stride 1 or 2 (a full conv only without an expand)")
    config = tile_config(kind, x.dtype, x.shape, _output_shape(x, w2, stride, padding, w3), stride[0], w2.shape[2])
    if config is None:
        return None, f"a {x.shape[3]}-pixel-wide map (one output row and its halo exceed the largest tile)"
    return kind, config


def _triton_forward(x: Tensor, w1: Tensor | None, b1: Tensor | None, act1: str, w2: Tensor, b2: Tensor | None,
                    act2: str, stride: list[int], padding: list[int], groups: int, w3: Tensor, b3: Tensor | None,
                    act3: str, residual: Tensor | None) -> Tensor:
    from evit_kernels.triton import conv_block as kernels

    kind, config = _whole_block_config(x, w1, w2, stride, padding, groups, w3)
    if kind is None:
        dispatch.log_once("conv_block", f"conv_block: layer by layer on the conv_bn_act kernels for {config}")
        return _per_layer(x, w1, b1, act1, w2, b2, act2, stride, padding, groups, w3, b3, act3, residual)
    out = torch.empty(_output_shape(x, w2, stride, padding, w3), dtype=x.dtype, device=x.device,
                      memory_format=output_memory_format(x))
    return kernels.forward(x, w1, b1, act1, w2, b2, act2, stride, padding, w3, b3, act3, residual, out, kind,
                           config)


def _per_layer(x: Tensor, *block: object) -> Tensor:
    """The fallback: each layer one conv_bn_act call, on its Triton kernel where that takes the layer."""
    triton_layer = dispatch.get("conv_bn_act", "triton")
    for layer in _layers(x, *block):
        chosen = "torch" if triton_layer.not_supported_reasons(x, *layer) else "triton"
        x = dispatch.get("conv_bn_act", chosen).forward(x, *layer)
    return x


def _triton_reasons(x: Tensor, w1: Tensor | None, b1: Tensor | None, act1: str, w2: Tensor, b2: Tensor | None,
                    act2: str, stride: list[int], padding: list[int], groups: int, w3: Tensor, b3: Tensor | None,
                    act3: str, residual: Tensor | None) -> list[str]:
    from evit_kernels.triton.conv_bn_act import fits_int32

    reasons = dispatch.kernel_reasons("triton", x)
    # The whole-block kernel never stores the hidden tensors; the per-layer fallback checks each layer itself.
    out_numel = math.prod(_output_shape(x, w2, stride, padding, w3))
    if out_numel >= 2**31 or not all(
            fits_int32(t) for t in (x, w1, b1, w2, b2, w3, b3, residual) if t is not None):
        reasons.append("a tensor of 2^31 elements or more (the kernels index with 32 bits)")
    return reasons


dispatch.register("conv_block", dispatch.Backend("triton", _triton_forward, _triton_reasons))
