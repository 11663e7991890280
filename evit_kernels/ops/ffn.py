"""``evit::ffn``: ``conv1x1(relu(conv1x1(x, w1, b1)), w2, b2) + residual``, the inference form of the
EfficientViT-M feed-forward block (timm ``ConvMlp`` / Cream ``FFN`` in their residual wrapper) once both
BatchNorms are folded into the 1×1 convs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from evit_kernels import dispatch
from evit_kernels.ops._library import AddsResidual, define_op
from evit_kernels.ops.conv_bn_act import output_memory_format


@dataclass(frozen=True)
class FfnArgs(AddsResidual):
    """The arguments of ``evit::ffn`` (see :func:`ffn`)."""

    op: ClassVar[str] = "ffn"
    x: Tensor
    w1: Tensor
    b1: Tensor | None
    w2: Tensor
    b2: Tensor | None
    residual: Tensor | None = None

    def output_shape(self) -> list[int]:
        return list(self.x.shape)

    def output_layout(self) -> torch.memory_format:
        return output_memory_format(self.x)


def ffn_reference(a: FfnArgs) -> Tensor:
    """Eager PyTorch: two 1×1 convs with a ReLU between, plus ``residual``; laid out as ``x`` is."""
    y = F.conv2d(F.relu(F.conv2d(a.x, a.w1, a.b1)), a.w2, a.b2)
    if a.residual is not None:
        y = y + a.residual
    return y.contiguous(memory_format=a.output_layout())


define_op(FfnArgs, ffn_reference)


def ffn(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, residual: Tensor | None = None,
        backend: str = "auto") -> Tensor:
    """``conv1x1(relu(conv1x1(x, w1, b1)), w2, b2) + residual``.

    ``x`` is (B, C, H, W) in NCHW or channels-last layout (the output keeps it); ``w1`` is (hidden, C, 1, 1) and
    ``w2`` (C, hidden, 1, 1); ``residual``, when given, has ``x``'s shape, and may be fp32 with fp16/bf16 inputs
    (the output is then fp32; docs/ops.md, "Inputs wider than the compute dtype").
    """
    _check_shapes(x, w1, b1, w2, b2, residual)
    return dispatch.run(FfnArgs(x, w1, b1, w2, b2, residual).cast_and_checked(), backend)


def _check_shapes(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
                  residual: Tensor | None) -> None:
    if x.dim() != 4:
        raise ValueError(f"ffn: x must be (B, C, H, W), got shape {tuple(x.shape)}")
    channels = x.shape[1]
    if w1.dim() != 4 or w1.shape[1:] != (channels, 1, 1):
        raise ValueError(f"ffn: w1 must be (hidden, {channels}, 1, 1) for x with {channels} channels, "
                         f"got {tuple(w1.shape)}")
    hidden = w1.shape[0]
    if tuple(w2.shape) != (channels, hidden, 1, 1):
        raise ValueError(f"ffn: w2 must be ({channels}, {hidden}, 1, 1), got {tuple(w2.shape)}")
    for name, bias, size in (("b1", b1, hidden), ("b2", b2, channels)):
        if bias is not None and tuple(bias.shape) != (size,):
            raise ValueError(f"ffn: {name} must have shape ({size},), got {tuple(bias.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"ffn: residual has shape {tuple(residual.shape)} but the output is {tuple(x.shape)}")


def _triton_forward(a: FfnArgs) -> Tensor:
    from evit_kernels.triton import ffn as kernels

    return kernels.forward(a, a.new_output())


def _triton_reasons(a: FfnArgs) -> list[str]:
    from evit_kernels.triton.ffn import MAX_CHANNELS

    if a.x.shape[1] > MAX_CHANNELS:
        return [f"{a.x.shape[1]} channels (the Triton kernel holds at most {MAX_CHANNELS} on chip)"]
    return []


dispatch.register("ffn", dispatch.Backend("triton", _triton_forward, _triton_reasons))
