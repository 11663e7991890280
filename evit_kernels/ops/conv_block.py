"""``evit::conv_block``: a whole EfficientViT conv block in its inference form, every BatchNorm folded:

    h   = act1(conv1x1(x, w1, b1))                 MBConv's expand (``w1`` None: DSConv, FusedMBConv)
    d   = act2(conv2d(h, w2, b2, stride, padding, groups))   depthwise (groups = width) or full (groups = 1)
    d   = d[:, :m] · gate(d[:, m:])                 GLU mode only (``gate`` given; m = half of d's channels)
    out = act3(conv1x1(d, w3, b3)) + residual       (``w3`` None: out = d, the block without its projection)

MBConv is expand → depthwise → project, DSConv depthwise → project, FusedMBConv full k×k → project; GLUMBConv is
MBConv in GLU mode; EfficientViT-M's PatchMerging is expand → depthwise without the projection (its squeeze-excite
comes before it) (docs/ops.md, "conv_block").
The Triton backend keeps ``d`` on chip for a DSConv, MBConv or FusedMBConv whose output channels one program holds
(in fp16/bf16 up to 512 behind a depthwise conv, 256 behind a full one; 128 in fp32) and whose output pixels make at
least a wave of tiles: the spatial conv and the projection in one kernel, after, for MBConv, the expand on
``evit::conv_bn_act``'s 1×1 kernel (``h`` written once, channels-last). Every other block runs layer by layer
through ``evit::conv_bn_act``'s kernels (per-layer fusion: each conv with its bias, activation and residual, a GLU
gate with the depthwise conv; the tensors between layers channels-last; a 1×1 layer with nothing to fuse on
PyTorch's conv), saying so once. Whole-block kernels that also kept ``h`` on chip (its tile gathered per tap), or
took ``d`` 16 channels at a time, measured 1.6–6.8× slower than eager on an H200, where the DSConv kernel and the
layer-by-layer kernels were faster than eager (docs/performance.md, "Measured on a GPU").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import Tensor

from evit_kernels import dispatch
from evit_kernels.ops._library import AddsResidual, RoundsInput, define_op
from evit_kernels.ops.conv_bn_act import (
    _ACTIVATION_FUNCTIONS,
    ACTIVATIONS,
    ConvBnActArgs,
    _pair,
    check_biases_and_output,
    conv_bn_act_reference,
    conv_output_shape,
    kernel_kind,
    output_memory_format,
    triton_forward_into,
)

_ONE, _ZERO = [1, 1], [0, 0]


@dataclass(frozen=True)
class ConvBlockArgs(AddsResidual, RoundsInput):
    """The arguments of ``evit::conv_block`` (see :func:`conv_block`), pairs as [height, width] lists."""

    op: ClassVar[str] = "conv_block"
    weight_field: ClassVar[str] = "w2"
    x: Tensor
    w1: Tensor | None
    b1: Tensor | None
    act1: str
    w2: Tensor
    b2: Tensor | None
    act2: str
    stride: list[int]
    padding: list[int]
    groups: int
    w3: Tensor | None
    b3: Tensor | None
    act3: str
    residual: Tensor | None = None
    gate: str | None = None

    def output_shape(self) -> list[int]:
        batch, _, out_height, out_width = conv_output_shape(self.x, self.w2, self.stride, self.padding, _ONE)
        return [batch, self.projected if self.w3 is None else self.w3.shape[0], out_height, out_width]

    @property
    def projected(self) -> int:
        """The channels of ``d`` the projection takes (half of the spatial conv's in GLU mode): the block's output
        channels without a projection."""
        mid = self.w2.shape[0]
        return mid if self.gate is None else mid // 2

    def output_layout(self) -> torch.memory_format:
        return output_memory_format(self.x)

    def layers(self) -> Iterator[Callable[[Tensor], ConvBnActArgs]]:
        """The block as ``conv_bn_act`` layers, each the arguments for its input (the previous layer's output)."""
        if self.w1 is not None:
            yield lambda t: ConvBnActArgs(t, self.w1, self.b1, _ONE, _ZERO, _ONE, 1, self.act1, None)
        yield lambda t: ConvBnActArgs(t, self.w2, self.b2, self.stride, self.padding, _ONE, self.groups, self.act2,
                                      None)
        if self.w3 is not None:
            yield lambda t: ConvBnActArgs(t, self.w3, self.b3, _ONE, _ZERO, _ONE, 1, self.act3, self.residual)

    def gated(self, d: Tensor) -> Tensor:
        """The projection's input: ``d`` itself, or in GLU mode its first half times ``gate`` of its second half, in
        ``d``'s dtype and layout, as eager computes it."""
        if self.gate is None:
            return d
        value, gate = d.chunk(2, dim=1)
        return (value * _ACTIVATION_FUNCTIONS[self.gate](gate)).contiguous(memory_format=output_memory_format(d))

    def run_layers(self, run: Callable[[ConvBnActArgs, bool], Tensor],
                   run_gated: Callable[[ConvBnActArgs, bool], Tensor] | None = None) -> Tensor:
        """The block layer after layer, each layer computed by ``run`` (from its arguments and whether its output is
        the block's), the GLU gate before the projection: applied to the spatial layer's output by :meth:`gated`, or,
        where ``run_gated`` is given, by ``run_gated`` itself as it computes the spatial layer."""
        layers = list(self.layers())
        spatial, project = (layers, None) if self.w3 is None else (layers[:-1], layers[-1])
        x = self.x
        for layer in spatial[:-1]:
            x = run(layer(x), False)
        last, ends = spatial[-1](x), project is None
        if self.gate is None:
            d = run(last, ends)
        else:
            d = self.gated(run(last, ends)) if run_gated is None else run_gated(last, ends)
        return d if project is None else run(project(d), True)


def conv_block_reference(a: ConvBlockArgs) -> Tensor:
    """Eager PyTorch, layer after layer; laid out as :func:`output_memory_format` of ``x``."""
    return a.run_layers(lambda layer, _last: conv_bn_act_reference(layer))


define_op(ConvBlockArgs, conv_block_reference)


def conv_block(x: Tensor, w1: Tensor | None, b1: Tensor | None, w2: Tensor, b2: Tensor | None, w3: Tensor | None,
               b3: Tensor | None, *, stride: int | Sequence[int] = 1, padding: int | Sequence[int] | None = None,
               groups: int | None = None, activations: Sequence[str] = ("none", "none", "none"),
               residual: Tensor | None = None, gate: str | None = None, backend: str = "auto") -> Tensor:
    """One EfficientViT conv block (see the module docstring), BatchNorms folded into the weights.

    ``x`` is (B, C_in, H, W), NCHW or channels-last (the output keeps it). ``w1`` (hidden, C_in, 1, 1) or None;
    ``w2`` (mid, width / groups, k, k) where width is hidden, or C_in without ``w1``; ``w3`` (C_out, mid, 1, 1),
    or (C_out, mid / 2, 1, 1) with ``gate``; or None: the block ends with ``d`` (gated in GLU mode), and takes no
    ``b3`` or ``residual``. ``padding`` defaults to k // 2 and ``groups`` to the width (depthwise). ``activations``
    names the three activations (one of :data:`ACTIVATIONS` each; the first is ignored without ``w1``, the third
    without ``w3``). ``gate``, one of :data:`ACTIVATIONS` or None, turns on the GLU mode: the projection takes
    ``d[:, :mid/2] · gate(d[:, mid/2:])``. ``residual``, when given, has the output's shape and is added last. An
    fp32 residual with fp16/bf16 inputs, and under autocast an fp32 ``x``, are taken as they are (docs/ops.md,
    "Inputs wider than the compute dtype").
    """
    act1, act2, act3 = activations
    for name in (*activations, *([] if gate is None else [gate])):
        if name not in ACTIVATIONS:
            raise ValueError(f"conv_block: unknown activation {name!r}; expected one of {ACTIVATIONS}")
    width = x.shape[1] if w1 is None else w1.shape[0]
    groups = width if groups is None else groups
    stride = _pair("stride", stride, 1)
    padding = _pair("padding", [w2.shape[2] // 2, w2.shape[3] // 2] if padding is None else padding, 0)
    args = ConvBlockArgs(x, w1, b1, act1, w2, b2, act2, stride, padding, groups, w3, b3, act3, residual, gate)
    _check_shapes(args)
    return dispatch.run(args.cast_and_checked(), backend)


def _check_shapes(a: ConvBlockArgs) -> None:
    x, w1, b1, w2, b2, groups, w3, b3 = a.x, a.w1, a.b1, a.w2, a.b2, a.groups, a.w3, a.b3
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
    if a.gate is not None and mid % 2:
        raise ValueError(f"conv_block: the GLU gate splits the spatial conv's channels in two halves, got {mid}")
    if w3 is None:
        if b3 is not None or a.residual is not None:
            raise ValueError("conv_block: b3 and residual belong to the projection; without w3 there is none")
    elif w3.dim() != 4 or tuple(w3.shape[1:]) != (a.projected, 1, 1):
        raise ValueError(f"conv_block: w3 must be (C_out, {a.projected}, 1, 1), got {tuple(w3.shape)}")
    check_biases_and_output(a, w2, f"padding {a.padding}", b1=(b1, width), b2=(b2, mid),
                            b3=(b3, 0 if w3 is None else w3.shape[0]))


# --- Triton ----------------------------------------------------------------------------------------------------


def _whole_block_config(a: ConvBlockArgs) -> tuple[dict | None, str]:
    """(tile config, "") for the spatial-conv-and-projection kernel, or (None, why this block runs layer by layer)."""
    from evit_kernels.triton import _common as common
    from evit_kernels.triton import conv_block as kernels
    from evit_kernels.triton.conv_bn_act import DENSE_MIN_TAP_CHANNELS

    depthwise = a.groups == a.w2.shape[0] and a.w2.shape[1] == 1
    if not depthwise and a.groups != 1:
        return None, f"a grouped spatial conv (groups {a.groups}; the kernel takes depthwise and full ones)"
    if a.w3 is None:
        return None, "no projection (the block ends with its spatial conv)"
    if a.gate is not None:
        return None, "a GLU gate (the spatial-conv-and-projection kernel does not gate)"
    k_h, k_w = a.w2.shape[2:]
    if k_h != k_w or k_h not in kernels.KERNEL_SIZES or a.stride[0] != a.stride[1] or a.stride[0] not in (1, 2):
        return None, (f"a {k_h}×{k_w} spatial conv with stride {a.stride} (the spatial-conv-and-projection kernel "
                      "takes square 3×3, 5×5 and 7×7 ones with stride 1 or 2)")
    if not depthwise and a.w2.shape[1] < DENSE_MIN_TAP_CHANNELS:
        return None, (f"a full conv of {a.w2.shape[1]} input channels (fewer than {DENSE_MIN_TAP_CHANNELS}: each "
                      f"tap's product steps over {kernels.BLOCK_K})")
    config = kernels.tile_config(a.compute_dtype(), depthwise, a.w3.shape[0])
    if config is None:
        return None, f"{a.w3.shape[0]} output channels (more than one program holds: a second would redo the taps)"
    batch, _, out_height, out_width = a.output_shape()
    if a.w1 is not None and batch * a.w1.shape[0] * a.x.shape[2] * a.x.shape[3] >= 2**31:
        return None, "an expanded tensor of 2^31 elements or more (the kernel indexes with 32 bits)"
    tiles = common.cdiv(batch * out_height * out_width, config["P"])
    if tiles < common.SMS:
        return None, (f"{tiles} pixel tiles, fewer than an H100's {common.SMS} SMs (one program holds every output "
                      "channel of a tile; the layer-by-layer kernels split a small grid finer)")
    return config, ""


def _triton_forward(a: ConvBlockArgs) -> Tensor:
    from evit_kernels.triton import conv_block as kernels

    config, why = _whole_block_config(a)
    if config is None:
        dispatch.log_once("conv_block", f"conv_block: layer by layer on the conv_bn_act kernels for {why}")
        return _per_layer(a)
    if a.w1 is not None:  # MBConv: the expand on conv_bn_act's 1×1 kernel, which rounds x as it loads it
        spatial_input = _per_layer_call(next(a.layers())(a.x), None)  # h channels-last
    elif config["DEPTHWISE"]:
        # the taps multiply x as loaded: an fp32 x is rounded first where the reference's conv would round it
        spatial_input = a.rounded_input()
    else:  # the full conv's products round x as they load it
        spatial_input = a.x
    return kernels.forward(replace(a, x=spatial_input, w1=None, b1=None), a.new_output(), config)


def _per_layer(a: ConvBlockArgs) -> Tensor:
    """The fallback: each layer one conv_bn_act call, on its Triton kernel where that takes the layer, and in GLU mode
    the gate applied by the depthwise kernel as it writes the conv's output (half the channels stored; eager's gate
    after any other spatial conv). The kernels write the tensors between layers channels-last whatever x's layout
    (the depthwise conv between them then reads and writes 16-byte vectors along the channels, where NCHW rows, read
    at stride 2, give it 2-byte ones), and the block's output in the block's layout."""
    from evit_kernels.triton import conv_bn_act as kernels

    layout = a.output_layout()

    def run(layer: ConvBnActArgs, last: bool) -> Tensor:
        return _per_layer_call(layer, layout if last else None)

    def run_gated(layer: ConvBnActArgs, last: bool) -> Tensor:
        if dispatch.get("conv_bn_act", "triton").not_supported_reasons(layer) or kernel_kind(layer) != "depthwise":
            return a.gated(run(layer, last))
        batch, _, out_height, out_width = layer.output_shape()
        out = torch.empty(batch, a.projected, out_height, out_width, dtype=layer.output_dtype(), device=a.x.device,
                          memory_format=layout if last else torch.channels_last)
        return kernels.depthwise(replace(layer, x=layer.rounded_input()), out, gate=a.gate)

    return a.run_layers(run, run_gated)


def _per_layer_call(args: ConvBnActArgs, block_layout: torch.memory_format | None) -> Tensor:
    """One layer: conv_bn_act's Triton kernel where it takes the layer and has something to fuse, else its
    reference; laid out as ``block_layout`` for the block's last layer (None: between layers, channels-last from the
    kernel)."""
    unsupported = dispatch.get("conv_bn_act", "triton").not_supported_reasons(args)
    plain = not unsupported and _plain_gemm(args)
    if plain:
        dispatch.log_once("conv_block", f"conv_block: PyTorch's conv for {plain}")
    if unsupported or plain:
        out = dispatch.get("conv_bn_act", "torch").forward(args)
        return out if block_layout is None else out.contiguous(memory_format=block_layout)
    return triton_forward_into(args, args.new_output(block_layout or torch.channels_last))


def _plain_gemm(args: ConvBnActArgs) -> str:
    """Why PyTorch's conv computes this layer (a 1×1 conv with no bias, activation or residual: a plain GEMM, which
    cuBLAS runs at least as fast as the kernel, with nothing for the kernel to fuse; GLUMBConv's bias-free
    projection), or ""."""
    if (kernel_kind(args) == "dense" and args.weight.shape[2:] == (1, 1) and args.bias is None
            and args.activation == "none" and args.residual is None):
        return "a 1×1 conv with no bias, activation or residual (a plain GEMM: nothing to fuse)"
    return ""


# The backend's checks cover x, the weights and the output; _whole_block_config an MBConv's h; the per-layer
# path checks each layer itself.
dispatch.register("conv_block", dispatch.Backend("triton", _triton_forward))
