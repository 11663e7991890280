"""``FusedLiteMLA``: LiteMLA (timm ``efficientvit_mit.LiteMLA``, mit-han-lab / efficientsam ``LiteMLA``) running
its multi-scale aggregation and ReLU linear attention through the evit ops (docs/ops.md, "ReLU linear
attention")."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from evit_kernels import dispatch
from evit_kernels.nn._base import FusedModule, Unsupported
from evit_kernels.nn._match import MIT_HAN_LAB, TIMM_MIT, Match
from evit_kernels.ops.multiscale_aggregation import multiscale_aggregation
from evit_kernels.ops.relu_linear_attention import choose_aggregated, relu_linear_attention

LITE_MLA = Match("timm/mit-han-lab", "LiteMLA", (TIMM_MIT, *MIT_HAN_LAB),
                 ("qkv", "aggreg", "kernel_func", "proj", "dim", "eps"))


class FusedLiteMLA(FusedModule):
    """Drop-in for a LiteMLA. ``qkv`` and ``proj`` stay the original children (they may be fused modules
    themselves, and they own the BatchNorms): LiteMLA's own parameters (the aggregation convs) have no BatchNorm
    to fold. When no gradient is needed and ``evit::relu_linear_attention_aggregated`` resolves to a kernel
    backend, the aggregation and the attention run as that one op and the aggregated maps are never written;
    otherwise (training, or the reference backend) as ``multiscale_aggregation`` then ``relu_linear_attention``."""

    MATCHES = (LITE_MLA,)

    def __init__(self, original: nn.Module, backend: str = "auto"):
        missing = LITE_MLA.missing(original)
        if missing:
            raise Unsupported(f"LiteMLA without attribute(s) {missing}")
        super().__init__(original, backend)
        self.dim = int(original.dim)
        self.eps = float(original.eps)
        self.heads = _heads(original.qkv, self.dim)
        if type(original.kernel_func) is not nn.ReLU:
            raise Unsupported(f"kernel_func is {type(original.kernel_func).__name__}, only nn.ReLU is supported")
        channels = 3 * self.heads * self.dim
        for index, scale in enumerate(original.aggreg):
            _check_aggregation(index, scale, channels, 3 * self.heads)
        proj_conv = getattr(original.proj, "conv", None)
        expected = self.heads * self.dim * (1 + len(original.aggreg))
        if isinstance(proj_conv, nn.Conv2d) and proj_conv.in_channels != expected:
            raise Unsupported(f"proj.conv takes {proj_conv.in_channels} channels but the attention makes {expected}")

    def forward(self, x: Tensor) -> Tensor:
        qkv = self.qkv(x)
        if not self._needs_attention_grad(qkv):
            dws, pws = [scale[0] for scale in self.aggreg], [scale[1] for scale in self.aggreg]
            args = (qkv, [dw.weight for dw in dws], [dw.bias for dw in dws], [pw.weight for pw in pws],
                    [pw.bias for pw in pws], self.dim, self.eps)
            # The fused op's reference backend is this same composition: take the op only for a kernel.
            chosen, op_args = choose_aggregated(*args, backend=self.backend)
            if chosen.name != "torch":
                return self.proj(dispatch.call(chosen, op_args))
        aggregated = [multiscale_aggregation(qkv, dw.weight, dw.bias, pw.weight, pw.bias, pw.groups,
                                             backend=self.backend)
                      for dw, pw in self.aggreg]
        return self.proj(relu_linear_attention(qkv, aggregated, self.dim, self.eps, backend=self.backend))

    def _needs_attention_grad(self, qkv: Tensor) -> bool:
        """Whether autograd needs the attention's backward: the fused op has only the reference's (slow)."""
        return torch.is_grad_enabled() and (qkv.requires_grad or any(p.requires_grad for p in self.aggreg.parameters()))

    def extra_repr(self) -> str:
        return f"heads={self.heads}, dim={self.dim}, eps={self.eps}, " + super().extra_repr()


def _heads(qkv: nn.Module, dim: int) -> int:
    conv = getattr(qkv, "conv", None)
    if not isinstance(conv, nn.Conv2d):
        raise Unsupported(f"qkv is {type(qkv).__name__} without a Conv2d at .conv; cannot read the head count")
    if dim < 1 or conv.out_channels % (3 * dim):
        raise Unsupported(f"qkv.conv makes {conv.out_channels} channels, not a multiple of 3·dim = {3 * dim}")
    return conv.out_channels // (3 * dim)


def _check_aggregation(index: int, scale: nn.Module, channels: int, groups: int) -> None:
    """Raise Unsupported unless ``scale`` is Sequential(depthwise k×k conv, k odd, zero padding k//2, stride 1,
    dilation 1; 1×1 conv with ``groups`` groups) on ``channels`` channels."""
    where = f"aggreg[{index}]"
    if not isinstance(scale, nn.Sequential) or len(scale) != 2 or not all(type(m) is nn.Conv2d for m in scale):
        raise Unsupported(f"{where} is not Sequential(Conv2d, Conv2d)")
    dw, pw = scale
    for name, conv in (("depthwise", dw), ("pointwise", pw)):
        if (conv.in_channels, conv.out_channels) != (channels, channels):
            raise Unsupported(f"{where} {name} conv maps {conv.in_channels}→{conv.out_channels} channels, "
                              f"expected {channels}→{channels}")
        if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
            raise Unsupported(f"{where} {name} conv has stride {conv.stride}, dilation {conv.dilation}, padding "
                              f"mode {conv.padding_mode!r}; only stride 1, dilation 1, zero padding are supported")
    kernel = dw.kernel_size[0]
    if dw.groups != channels or dw.kernel_size != (kernel, kernel) or kernel % 2 == 0 \
            or dw.padding != (kernel // 2, kernel // 2):
        raise Unsupported(f"{where} depthwise conv has groups={dw.groups}, kernel {dw.kernel_size}, padding "
                          f"{dw.padding}; expected groups={channels}, an odd square kernel k and padding k//2")
    if pw.kernel_size != (1, 1) or pw.groups != groups or pw.padding != (0, 0):
        raise Unsupported(f"{where} pointwise conv has kernel {pw.kernel_size}, groups={pw.groups}, padding "
                          f"{pw.padding}; expected a 1×1 kernel, groups={groups} (3·heads), no padding")
