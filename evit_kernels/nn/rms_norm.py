"""The channel norms running as ``evit::rms_norm`` (docs/ops.md, "RMSNorm"):

- ``FusedRMSNorm``: diffusers' ``RMSNorm`` (the channel norms of DC-AE's ResBlocks, GLUMBConvs and multi-scale
  attentions, applied to ``x.movedim(1, -1)``; the Sana transformers' q/k and caption norms);
- ``FusedTritonRMSNorm2d``: mit-han-lab's ``TritonRMSNorm2d`` (its DC-AE's channel norm of NCHW maps), whose own
  kernel runs only on CUDA: patched, the model also runs on a CPU;
- ``FusedLayerNorm2d``: mit-han-lab's ``LayerNorm2d`` (the channel LayerNorm that ends the SAM image encoders), nine
  eager passes over the map in one."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from evit_kernels.nn._base import FusedModule, Unsupported
from evit_kernels.nn._match import DIFFUSERS_NORMALIZATION, MIT_HAN_LAB_NORM, Match
from evit_kernels.ops._library import autocast_off
from evit_kernels.ops.rms_norm import rms_norm

DIFFUSERS_RMS_NORM = Match("diffusers", "RMSNorm", (DIFFUSERS_NORMALIZATION,),
                           ("eps", "elementwise_affine", "dim", "weight", "bias"))


def computes_as_diffusers(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    """Whether ``evit::rms_norm`` gives diffusers' ``RMSNorm`` output dtype for these tensors: one dtype, on a CPU or
    CUDA tensor, outside autocast (elsewhere the original's own forward runs)."""
    device = x.device.type
    return (all(t is None or t.dtype == x.dtype for t in (weight, bias)) and device in ("cpu", "cuda", "meta")
            and not (device != "meta" and torch.is_autocast_enabled(device)))


def _adopt_norm_attributes(fused: FusedModule, original: nn.Module, names: tuple[str, ...]) -> None:
    """The original norm's plain attributes ``names``, and its ``weight`` and ``bias`` as None where it has none (a
    plain attribute, as the originals keep them)."""
    for name in names:
        fused.__dict__[name] = getattr(original, name)
    for name in ("weight", "bias"):
        if name not in fused._parameters:
            fused.__dict__[name] = None


class FusedRMSNorm(FusedModule):
    """Drop-in for diffusers' ``RMSNorm`` over the last dimension.

    The op runs when x, the weight and the bias share one dtype, on a CPU or CUDA tensor, outside autocast: then the
    original computes in fp32 and rounds to that dtype (then multiplies and adds in it for fp16 and bf16 weights; the op
rounds once). Otherwise the
    original's own forward runs, with its dtype rules (an fp32 output for low-precision inputs with fp32 weights,
    as under autocast) and its NPU kernel.
    """

    MATCHES = (DIFFUSERS_RMS_NORM,)

    def __init__(self, original: nn.Module, backend: str = "auto"):
        if len(original.dim) != 1:
            raise Unsupported(f"normalized shape {tuple(original.dim)}: only one dimension is supported")
        super().__init__(original, backend)
        _adopt_norm_attributes(self, original, ("eps", "elementwise_affine", "dim"))

    def forward(self, hidden_states: Tensor) -> Tensor:
        if computes_as_diffusers(hidden_states, self.weight, self.bias):
            return rms_norm(hidden_states, self.weight, self.bias, self.eps, backend=self.backend)
        return type(self.original).forward(self, hidden_states)

    def extra_repr(self) -> str:
        return f"{tuple(self.dim)}, eps={self.eps}, " + super().extra_repr()


_NORM_2D_ATTRIBUTES = ("normalized_shape", "eps", "elementwise_affine", "weight", "bias")


class _ChannelNorm2d(FusedModule):
    """What the drop-ins for mit-han-lab's channel norms of (B, C, H, W) maps (``nn.LayerNorm`` subclasses over C)
    share: the original's attributes, one normalised dimension, and the map's shape checked on every call."""

    def __init__(self, original: nn.Module, backend: str = "auto"):
        if len(original.normalized_shape) != 1:
            raise Unsupported(f"normalized shape {tuple(original.normalized_shape)}: it normalises the channels")
        super().__init__(original, backend)
        _adopt_norm_attributes(self, original, ("normalized_shape", "eps", "elementwise_affine"))

    def _check_map(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.normalized_shape[0]:
            raise ValueError(f"{type(self).__name__}: expected a (B, {self.normalized_shape[0]}, H, W) map, got "
                             f"shape {tuple(x.shape)}")

    def extra_repr(self) -> str:
        return f"{tuple(self.normalized_shape)}, eps={self.eps}, " + super().extra_repr()


class FusedTritonRMSNorm2d(_ChannelNorm2d):
    """Drop-in for mit-han-lab's ``TritonRMSNorm2d`` (an ``nn.LayerNorm`` over the channels of a (B, C, H, W) map):
    ``x / sqrt(mean_c(x²) + eps) · weight + bias`` computed in fp32 and rounded once to x's dtype, as its Triton
    kernel does, through the map's channel view (no copy). Weights of another dtype than x (autocast) are applied
    in fp32 too."""

    MATCHES = (Match("mit-han-lab", "TritonRMSNorm2d", MIT_HAN_LAB_NORM, _NORM_2D_ATTRIBUTES),)

    def forward(self, x: Tensor) -> Tensor:
        self._check_map(x)
        params = (self.weight, self.bias)
        if any(p is not None and p.dtype != x.dtype for p in params):
            y = rms_norm(x.float().movedim(1, -1), *(None if p is None else p.float() for p in params), self.eps,
                         backend=self.backend)
            return y.movedim(-1, 1).to(x.dtype)
        return rms_norm(x.movedim(1, -1), *params, self.eps, backend=self.backend).movedim(-1, 1)


class FusedLayerNorm2d(_ChannelNorm2d):
    """Drop-in for mit-han-lab's ``LayerNorm2d`` (an ``nn.LayerNorm`` over the channels of a (B, C, H, W) map, which
    computes ``x - mean_c(x)``, divides it by ``sqrt(mean_c(·²) + eps)`` and applies weight and bias, each step an
    eager op in x's dtype): one centered ``rms_norm`` through the map's channel view, in fp32, rounded once. The
    output dtype is the original's: x's, or the promoted dtype where the weights are of another (fp32 weights under
    autocast: an fp32 map, as the original's product with them gives). Its operations are not autocast's, so the op
    runs with autocast off: nothing is cast that the original would not cast."""

    MATCHES = (Match("mit-han-lab", "LayerNorm2d", MIT_HAN_LAB_NORM, _NORM_2D_ATTRIBUTES),)

    def forward(self, x: Tensor) -> Tensor:
        self._check_map(x)
        params = (self.weight, self.bias) if self.elementwise_affine else (None, None)
        dtype = x.dtype
        for p in params:
            dtype = dtype if p is None else torch.promote_types(dtype, p.dtype)
        with autocast_off(x):
            return rms_norm(x.to(dtype).movedim(1, -1), *(None if p is None else p.to(dtype) for p in params),
                            self.eps, centered=True, backend=self.backend).movedim(-1, 1)
