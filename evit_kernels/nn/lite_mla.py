"""``FusedLiteMLA``: LiteMLA (timm ``efficientvit_mit.LiteMLA``, mit-han-lab / efficientsam ``LiteMLA``) running
its multi-scale aggregation and ReLU linear attention through the evit ops (docs/ops.md, "ReLU linear
attention"); ``FusedSanaMultiscaleLinearAttention``, the same for diffusers' ``SanaMultiscaleLinearAttention``
(DC-AE's LiteMLA with linear projections, an output norm and a residual)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from evit_kernels import dispatch
from evit_kernels.nn._base import FusedModule, Unsupported
from evit_kernels.nn._fold import FoldCache, uses_running_stats
from evit_kernels.nn._match import DIFFUSERS_ATTENTION, MIT_HAN_LAB, TIMM_MIT, Match
from evit_kernels.nn.conv_bn_act import with_residual
from evit_kernels.nn.rms_norm import computes_as_diffusers
from evit_kernels.ops.conv_bn_act import conv_bn_act
from evit_kernels.ops.multiscale_aggregation import multiscale_aggregation
from evit_kernels.ops.relu_linear_attention import choose_aggregated, relu_linear_attention
from evit_kernels.ops.rms_norm import rms_norm

LITE_MLA = Match("timm/mit-han-lab", "LiteMLA", (TIMM_MIT, *MIT_HAN_LAB),
                 ("qkv", "aggreg", "kernel_func", "proj", "dim", "eps"))
SANA_MULTISCALE = Match("diffusers", "SanaMultiscaleLinearAttention", (DIFFUSERS_ATTENTION,),
                        ("to_q", "to_k", "to_v", "to_qkv_multiscale", "nonlinearity", "to_out", "norm_out", "norm_type",
                         "residual_connection", "attention_head_dim", "eps", "processor"))


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

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """The original's output, plus ``residual`` when given (in ``proj``'s op call: see :func:`with_residual`)."""
        scales = [(scale[0], scale[1]) for scale in self.aggreg]
        out = multiscale_relu_linear_attention(self.qkv(x), scales, self.dim, self.eps, self.backend)
        return with_residual(self.proj, out, residual)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, dim={self.dim}, eps={self.eps}, " + super().extra_repr()


class FusedSanaMultiscaleLinearAttention(FusedModule):
    """Drop-in for diffusers' ``SanaMultiscaleLinearAttention`` with its stock processor: the projections ``to_q``,
    ``to_k``, ``to_v`` (called as the processor calls them, so adapters on them keep working) make the
    head-interleaved qkv map, whose multi-scale projections and ReLU linear attention run as for LiteMLA
    (:func:`multiscale_relu_linear_attention`: on inference with a kernel, the projections folded into the
    attention's loads); then ``to_out``, ``norm_out`` (over the channels for RMSNorm, as the processor applies it)
    and the residual: an RMSNorm of one dtype with its input takes the residual in the same ``rms_norm`` call (one
    rounding; ``norm_out`` is then computed here, not called); a BatchNorm on its running statistics after a plain
    ``nn.Linear`` ``to_out`` (no adapter on it) is folded into it, and the three run as one ``conv_bn_act`` call
    (neither module is then called). The processor's quadratic branch for maps of at most
    ``attention_head_dim`` pixels is the same function in another order of sums; the linear form is computed for
    every size."""

    MATCHES = (SANA_MULTISCALE,)

    def __init__(self, original: nn.Module, backend: str = "auto"):
        processor = type(original.processor)
        if (processor.__name__, processor.__module__) != ("SanaMultiscaleAttnProcessor2_0", DIFFUSERS_ATTENTION):
            raise Unsupported(f"processor is {processor.__module__}.{processor.__qualname__}, not diffusers' "
                              "SanaMultiscaleAttnProcessor2_0")
        if type(original.nonlinearity) is not nn.ReLU:
            raise Unsupported(f"nonlinearity is {type(original.nonlinearity).__name__}, only nn.ReLU is supported")
        super().__init__(original, backend)
        self.dim = int(original.attention_head_dim)
        self.eps = float(original.eps)
        inner = {getattr(original, name).out_features for name in ("to_q", "to_k", "to_v")
                 if hasattr(getattr(original, name), "out_features")}
        if len(inner) != 1 or next(iter(inner)) % self.dim:
            raise Unsupported(f"to_q, to_k, to_v make {sorted(inner)} features, not one multiple of the head dim "
                              f"{self.dim}")
        self.heads = next(iter(inner)) // self.dim
        for index, scale in enumerate(original.to_qkv_multiscale):
            check_aggregation_convs(f"to_qkv_multiscale[{index}]", getattr(scale, "proj_in", None),
                                    getattr(scale, "proj_out", None), 3 * self.heads * self.dim, 3 * self.heads)
        self._fold_cache = FoldCache()

    def forward(self, hidden_states: Tensor) -> Tensor:
        residual = hidden_states
        x = hidden_states.movedim(1, -1)
        qkv = torch.cat([self.to_q(x), self.to_k(x), self.to_v(x)], dim=3).movedim(-1, 1)  # channels-last map
        scales = [(scale.proj_in, scale.proj_out) for scale in self.to_qkv_multiscale]
        out = multiscale_relu_linear_attention(qkv, scales, self.dim, self.eps, self.backend)
        norm = self.norm_out
        if self.original.norm_type != "rms_norm":
            skip = residual if self.original.residual_connection else None
            if type(self.to_out) is nn.Linear and isinstance(norm, nn.BatchNorm2d) and uses_running_stats(norm):
                # to_out, the BatchNorm and the residual as one conv_bn_act call: the BatchNorm folded into to_out
                (weight, bias), = self._fold_cache.fold([(self.to_out, norm)])
                return conv_bn_act(out, weight[:, :, None, None], bias, 1, 0, 1, 1, "none", residual=skip,
                                   backend=self.backend)
            out = norm(self.to_out(out.movedim(1, -1)).movedim(-1, 1))
            return out if skip is None else out + skip
        out = self.to_out(out.movedim(1, -1))  # channels last
        weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
        skip = residual.movedim(1, -1) if self.original.residual_connection else None
        if computes_as_diffusers(out, weight, bias) and (skip is None or skip.dtype == out.dtype):
            # the RMSNorm and the residual as one rms_norm call, the sum rounded once
            return rms_norm(out, weight, bias, norm.eps, residual=skip, backend=self.backend).movedim(-1, 1)
        out = norm(out).movedim(-1, 1)
        return out + residual if self.original.residual_connection else out

    def extra_repr(self) -> str:
        return f"heads={self.heads}, dim={self.dim}, eps={self.eps}, " + super().extra_repr()


def multiscale_relu_linear_attention(qkv: Tensor, scales: list[tuple[nn.Conv2d, nn.Conv2d]], dim: int, eps: float,
                                     backend: str) -> Tensor:
    """The attention of LiteMLA (and of diffusers' ``SanaMultiscaleLinearAttention``) over the head-interleaved
    ``qkv`` map and its multi-scale aggregations, ``scales`` holding each scale's (depthwise, grouped pointwise)
    convs. When no gradient is needed and ``evit::relu_linear_attention_aggregated`` resolves to a kernel backend,
    the aggregation and the attention run as that one op and the aggregated maps are never written; otherwise
    (training, or the reference backend) as ``multiscale_aggregation`` then ``relu_linear_attention``: the fused op
    has only the reference's (slow) backward."""
    needs_grad = torch.is_grad_enabled() and (
        qkv.requires_grad or any(p.requires_grad for convs in scales for conv in convs for p in conv.parameters()))
    if not needs_grad:
        args = (qkv, [dw.weight for dw, _ in scales], [dw.bias for dw, _ in scales], [pw.weight for _, pw in scales],
                [pw.bias for _, pw in scales], dim, eps)
        # The fused op's reference backend is this same composition: take the op only for a kernel.
        chosen, op_args = choose_aggregated(*args, backend=backend)
        if chosen.name != "torch":
            return dispatch.call(chosen, op_args)
    aggregated = [multiscale_aggregation(qkv, dw.weight, dw.bias, pw.weight, pw.bias, pw.groups, backend=backend)
                  for dw, pw in scales]
    return relu_linear_attention(qkv, aggregated, dim, eps, backend=backend)


def _heads(qkv: nn.Module, dim: int) -> int:
    conv = getattr(qkv, "conv", None)
    if not isinstance(conv, nn.Conv2d):
        raise Unsupported(f"qkv is {type(qkv).__name__} without a Conv2d at .conv; cannot read the head count")
    if dim < 1 or conv.out_channels % (3 * dim):
        raise Unsupported(f"qkv.conv makes {conv.out_channels} channels, not a multiple of 3·dim = {3 * dim}")
    return conv.out_channels // (3 * dim)


def _check_aggregation(index: int, scale: nn.Module, channels: int, groups: int) -> None:
    """Raise Unsupported unless ``scale`` is Sequential(depthwise k×k conv, 1×1 conv) as
    :func:`check_aggregation_convs` describes."""
    if not isinstance(scale, nn.Sequential) or len(scale) != 2 or not all(type(m) is nn.Conv2d for m in scale):
        raise Unsupported(f"aggreg[{index}] is not Sequential(Conv2d, Conv2d)")
    check_aggregation_convs(f"aggreg[{index}]", *scale, channels, groups)


def check_aggregation_convs(where: str, dw: nn.Conv2d, pw: nn.Conv2d, channels: int, groups: int) -> None:
    """Raise Unsupported unless ``dw`` is a depthwise k×k conv (k odd, zero padding k//2, stride 1, dilation 1) and
    ``pw`` a 1×1 conv with ``groups`` groups, both on ``channels`` channels."""
    for name, conv in (("depthwise", dw), ("pointwise", pw)):
        if type(conv) is not nn.Conv2d:
            raise Unsupported(f"{where} {name} conv is {type(conv).__name__}, not nn.Conv2d")
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
