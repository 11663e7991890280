"""``FusedRMSNorm``: diffusers' ``RMSNorm`` (the channel norms of DC-AE's ResBlocks, GLUMBConvs and multi-scale
attentions, applied to ``x.movedim(1, -1)``; the Sana transformers' q/k and caption norms) running as
``evit::rms_norm`` (docs/ops.md, "RMSNorm")."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from evit_kernels.nn._base import FusedModule, Unsupported
from evit_kernels.nn._match import DIFFUSERS_NORMALIZATION, Match
from evit_kernels.ops.rms_norm import rms_norm

DIFFUSERS_RMS_NORM = Match("diffusers", "RMSNorm", (DIFFUSERS_NORMALIZATION,),
                           ("eps", "elementwise_affine", "dim", "weight", "bias"))


def computes_as_diffusers(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    """Whether ``evit::rms_norm`` gives diffusers' ``RMSNorm`` output dtype for these tensors: one dtype, on a CPU or
    CUDA tensor, outside autocast (elsewhere the original's own forward runs)."""
    device = x.device.type
    return (all(t is None or t.dtype == x.dtype for t in (weight, bias)) and device in ("cpu", "cuda", "meta")
            and not (device != "meta" and torch.is_autocast_enabled(device)))


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
        for name in ("eps", "elementwise_affine", "dim"):
            self.__dict__[name] = getattr(original, name)
        for name in ("weight", "bias"):  # None when absent: a plain attribute, as in the original
            if name not in self._parameters:
                self.__dict__[name] = None

    def forward(self, hidden_states: Tensor) -> Tensor:
        if computes_as_diffusers(hidden_states, self.weight, self.bias):
            return rms_norm(hidden_states, self.weight, self.bias, self.eps, backend=self.backend)
        return type(self.original).forward(self, hidden_states)

    def extra_repr(self) -> str:
        return f"{tuple(self.dim)}, eps={self.eps}, " + super().extra_repr()
