"""``evit::rms_norm``: RMSNorm over the last dimension of any view, as diffusers' ``RMSNorm`` computes it, including
the channel RMSNorm of DC-AE (applied to ``x.movedim(1, -1)``: the channels are read through their stride, nothing
is copied) and the q/k norms and caption norm of the Sana transformers, with an optional residual added after the
norm (DC-AE's GLUMBConv: ``x + norm(y)``); ``centered``, the RMSNorm of ``x - mean(x)``: a LayerNorm (mit-han-lab's
channel ``LayerNorm2d``) (docs/ops.md, "RMSNorm")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from evit_kernels import dispatch
from evit_kernels.ops._library import OpArgs, autocast_off, define_op


@dataclass(frozen=True)
class RmsNormArgs(OpArgs):
    """The arguments of ``evit::rms_norm`` (see :func:`rms_norm`)."""

    op: ClassVar[str] = "rms_norm"
    x: Tensor
    weight: Tensor | None
    bias: Tensor | None
    eps: float
    residual: Tensor | None = None
    centered: bool = False

    def output_shape(self) -> list[int]:
        return list(self.x.shape)

    def new_output(self) -> Tensor:
        """Laid out as ``x`` (strides kept for a dense ``x``): the channel view of an NCHW map gives an output whose
        ``movedim(-1, 1)`` is a contiguous NCHW map again, as eager's elementwise ops give."""
        return torch.empty_like(self.x)


def rms_norm_reference(a: RmsNormArgs) -> Tensor:
    """Eager PyTorch: ``x · rsqrt(mean(x², -1) + eps) · weight + bias + residual`` (``centered``: x - mean(x, -1) in
    place of x) in fp32 (fp64 for fp64 inputs), rounded once to ``x``'s dtype and laid out as ``x``."""
    compute = torch.promote_types(a.x.dtype, torch.float32)
    with autocast_off(a.x):
        x = a.x.to(compute)
        if a.centered:
            x = x - x.mean(-1, keepdim=True)
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + a.eps)
        if a.weight is not None:
            y = y * a.weight.to(compute)
        if a.bias is not None:
            y = y + a.bias.to(compute)
        if a.residual is not None:
            y = y + a.residual.to(compute)
    return y.to(a.x.dtype)


define_op(RmsNormArgs, rms_norm_reference)


def rms_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, residual: Tensor | None = None,
             centered: bool = False, backend: str = "auto") -> Tensor:
    """RMSNorm of ``x`` over its last dimension (C): ``x / sqrt(mean(x²) + eps) · weight + bias + residual``,
    ``weight`` and ``bias`` (C,) or None, ``residual`` shaped as ``x`` or None, computed in fp32 and returned in
    ``x``'s dtype and layout. ``x`` may be any view: the channel RMSNorm of an NCHW map is
    ``rms_norm(x.movedim(1, -1), ...).movedim(-1, 1)``. ``centered``: the same of ``x - mean(x)``, i.e. a LayerNorm
    (the RMS of the centered values is their standard deviation)."""
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"rms_norm: x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (x.shape[-1],):
            raise ValueError(f"rms_norm: {name} must have shape ({x.shape[-1]},), got {tuple(t.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual has shape {tuple(residual.shape)} but x {tuple(x.shape)}")
    return dispatch.run(RmsNormArgs(x, weight, bias, float(eps), residual, bool(centered)).cast_and_checked(), backend)


def rows(x: Tensor) -> tuple[int, int, int, int] | None:
    """(outer, inner, outer stride, inner stride) when the leading dimensions of ``x`` can be walked as row
    ``o·inner + i`` at offset ``o·outer_stride + i·inner_stride`` (a contiguous tensor, or the channel view of a
    contiguous or channels-last map); None otherwise."""
    dims = [(size, stride) for size, stride in zip(x.shape[:-1], x.stride()[:-1]) if size != 1]
    merged: list[list[int]] = []
    for size, stride in reversed(dims):  # merge a dimension into the one after it when their strides chain
        if merged and stride == merged[-1][0] * merged[-1][1]:
            merged[-1][0] *= size
        else:
            merged.append([size, stride])
    if len(merged) > 2:
        return None
    (inner, inner_stride), (outer, outer_stride) = ([*merged, [1, 0], [1, 0]])[:2]
    return outer, inner, outer_stride, inner_stride


def _triton_forward(a: RmsNormArgs) -> Tensor:
    from evit_kernels.triton import rms_norm as kernels

    return kernels.forward(a, a.new_output())


def _triton_reasons(a: RmsNormArgs) -> list[str]:
    return [f"{name}'s leading dimensions cannot be walked as rows with two strides (make it contiguous)"
            for name, t in (("x", a.x), ("residual", a.residual)) if t is not None and rows(t) is None]


dispatch.register("rms_norm", dispatch.Backend("triton", _triton_forward, _triton_reasons))
