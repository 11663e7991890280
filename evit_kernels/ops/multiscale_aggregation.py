"""``multiscale_aggregation``: one scale of LiteMLA's multi-scale token aggregation, a depthwise k×k conv
(zero padding k//2) followed by a grouped 1×1 conv with one d×d matrix per q/k/v block of each head
(docs/ops.md, "Multi-scale aggregation and the aggregated form")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from evit_kernels import dispatch
from evit_kernels.ops._library import OpArgs, reference_backend


@dataclass(frozen=True)
class MultiscaleAggregationArgs(OpArgs):
    """The arguments of :func:`multiscale_aggregation`."""

    op: ClassVar[str] = "multiscale_aggregation"
    qkv: Tensor
    dw_weight: Tensor
    dw_bias: Tensor | None
    pw_weight: Tensor
    pw_bias: Tensor | None
    groups: int

    def output_shape(self) -> list[int]:
        return list(self.qkv.shape)


def multiscale_aggregation_reference(a: MultiscaleAggregationArgs) -> Tensor:
    """Eager PyTorch: ``conv1x1(dwconv_k(qkv), groups=groups)``, in NCHW layout (the layout the attention reads:
    one row of H·W tokens per channel)."""
    channels, kernel = a.qkv.shape[1], a.dw_weight.shape[-1]
    local = F.conv2d(a.qkv, a.dw_weight, a.dw_bias, padding=kernel // 2, groups=channels)
    return F.conv2d(local, a.pw_weight, a.pw_bias, groups=a.groups).contiguous()


# Only the reference exists: no torch.library op (a kernel would add one, through define_op). The registration keeps
# an explicit request for a kernel backend failing loudly instead of running the reference unasked.
dispatch.register("multiscale_aggregation", reference_backend(multiscale_aggregation_reference))


def multiscale_aggregation(qkv: Tensor, dw_weight: Tensor, dw_bias: Tensor | None, pw_weight: Tensor,
                           pw_bias: Tensor | None, groups: int, backend: str = "auto") -> Tensor:
    """Aggregate ``qkv`` (B, C, H, W) over a k×k neighbourhood: depthwise conv with ``dw_weight`` (C, 1, k, k),
    k odd, zero padding k//2, then a 1×1 conv with ``pw_weight`` (C, C / groups, 1, 1) and ``groups`` groups
    (3·heads in LiteMLA). Returns (B, C, H, W), contiguous, in ``qkv``'s dtype."""
    _check_shapes(qkv, dw_weight, dw_bias, pw_weight, pw_bias, groups)
    args = MultiscaleAggregationArgs(qkv, dw_weight, dw_bias, pw_weight, pw_bias, groups)
    return dispatch.run(args.cast_and_checked(), backend)


def _check_shapes(qkv: Tensor, dw_weight: Tensor, dw_bias: Tensor | None, pw_weight: Tensor,
                  pw_bias: Tensor | None, groups: int) -> None:
    if qkv.dim() != 4:
        raise ValueError(f"multiscale_aggregation: qkv must be (B, C, H, W), got shape {tuple(qkv.shape)}")
    channels = qkv.shape[1]
    if dw_weight.dim() != 4 or dw_weight.shape[:2] != (channels, 1) or dw_weight.shape[2] != dw_weight.shape[3] \
            or dw_weight.shape[2] % 2 == 0:
        raise ValueError(f"multiscale_aggregation: dw_weight must be ({channels}, 1, k, k) with k odd for "
                         f"{channels} input channels, got {tuple(dw_weight.shape)}")
    if not isinstance(groups, int) or groups < 1 or channels % groups:
        raise ValueError(f"multiscale_aggregation: groups={groups!r} must be a positive int dividing the "
                         f"{channels} channels")
    if tuple(pw_weight.shape) != (channels, channels // groups, 1, 1):
        raise ValueError(f"multiscale_aggregation: pw_weight must be ({channels}, {channels // groups}, 1, 1) for "
                         f"{channels} channels in {groups} groups, got {tuple(pw_weight.shape)}")
    for name, bias in (("dw_bias", dw_bias), ("pw_bias", pw_bias)):
        if bias is not None and tuple(bias.shape) != (channels,):
            raise ValueError(f"multiscale_aggregation: {name} must have shape ({channels},), got {tuple(bias.shape)}")
