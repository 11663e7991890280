"""`patch(model)`: swap recognised modules of an existing model for fused drop-ins; `unpatch` reverts it.

Recognition is declarative (:data:`RULES`): a module is swapped only when its class is defined where the rule
says (``type(m).__module__``) and carries every attribute the rule lists; the replacement's constructor then
checks the configuration and refuses (``Unsupported``) what it cannot compute exactly. Anything else is left
untouched, and the report says why when the class name looked like ours.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from evit_kernels.nn._base import FusedModule, Unsupported
from evit_kernels.nn._fold import fold_bn_before_linear, fold_bn_into, uses_running_stats
from evit_kernels.nn.cascaded_group_attention import FusedCascadedGroupAttention, FusedLocalWindowAttention
from evit_kernels.nn.conv_block import FusedConvBlock, is_conv_block
from evit_kernels.nn.conv_bn_act import FusedConvNormAct, FusedResidualConvNorm
from evit_kernels.nn.ffn import FusedResidualFFN
from evit_kernels.nn.lite_mla import FusedLiteMLA
from evit_kernels.nn.norm_linear import FusedNormLinear

TIMM_MIT = "timm.models.efficientvit_mit"
TIMM_MSRA = "timm.models.efficientvit_msra"
MIT_HAN_LAB = ("efficientsam.models.nn.ops", "efficientvit.models.nn.ops")
PACKAGED = ("timm.", "efficientsam.", "efficientvit.", "torch.")
"""Packages whose classes only the rules naming their exact module may match."""


@dataclass(frozen=True)
class Rule:
    """Swap instances of ``class_name`` defined in one of ``modules`` and holding ``attributes``.

    ``modules`` None means Cream-style code, which users copy into their own files: any defining module outside
    :data:`PACKAGED`. Whether the replacement's children are patched too is its own ``patch_inside``.
    ``accepts`` tells apart instances of one class that hold different blocks (a residual wrapper around an FFN
    or around a depthwise conv): a module it rejects is simply not this rule's, and goes unreported.
    """

    family: str
    class_name: str
    modules: tuple[str, ...] | None
    attributes: tuple[str, ...]
    replacement: type[FusedModule]
    accepts: Callable[[nn.Module], bool] = lambda module: True

    def defined_here(self, module: nn.Module) -> bool:
        where = type(module).__module__
        return where in self.modules if self.modules is not None else not where.startswith(PACKAGED)

    def missing(self, module: nn.Module) -> list[str]:
        return [a for a in self.attributes if not hasattr(module, a)]


_CGA = ("qkvs", "dws", "proj", "attention_biases", "attention_bias_idxs", "key_dim", "num_heads", "scale")
RULES: tuple[Rule, ...] = (
    Rule("timm/mit-han-lab", "LiteMLA", (TIMM_MIT, *MIT_HAN_LAB),
         ("qkv", "aggreg", "kernel_func", "proj", "dim", "eps"), FusedLiteMLA),
    Rule("timm", "LocalWindowAttention", (TIMM_MSRA,), ("attn", "resolution", "window_resolution"),
         FusedLocalWindowAttention),
    Rule("Cream", "LocalWindowAttention", None, ("attn", "resolution", "window_resolution"),
         FusedLocalWindowAttention),
    Rule("timm", "CascadedGroupAttention", (TIMM_MSRA,), (*_CGA, "val_dim"), FusedCascadedGroupAttention),
    Rule("Cream", "CascadedGroupAttention", None, (*_CGA, "d"), FusedCascadedGroupAttention),
    Rule("timm", "ResidualDrop", (TIMM_MSRA,), ("m", "drop"), FusedResidualFFN,
         accepts=lambda module: type(module.m).__name__ == "ConvMlp"),
    Rule("Cream", "Residual", None, ("m",), FusedResidualFFN, accepts=lambda module: type(module.m).__name__ == "FFN"),
    Rule("timm", "ResidualDrop", (TIMM_MSRA,), ("m", "drop"), FusedResidualConvNorm,
         accepts=lambda module: type(module.m).__name__ == "ConvNorm"),
    Rule("Cream", "Residual", None, ("m",), FusedResidualConvNorm,
         accepts=lambda module: type(module.m).__name__ == "Conv2d_BN"),
    Rule("timm", "ResidualBlock", (TIMM_MIT,), ("main", "shortcut", "pre_norm"), FusedConvBlock,
         accepts=lambda module: is_conv_block(module.main)),
    Rule("mit-han-lab", "ResidualBlock", MIT_HAN_LAB, ("main", "shortcut", "pre_norm", "post_act"), FusedConvBlock,
         accepts=lambda module: is_conv_block(module.main)),
    Rule("timm", "ConvNormAct", (TIMM_MIT,), ("dropout", "conv", "norm", "act"), FusedConvNormAct),
    Rule("mit-han-lab", "ConvLayer", MIT_HAN_LAB, ("dropout", "conv", "norm", "act"), FusedConvNormAct),
    Rule("timm", "ConvNorm", (TIMM_MSRA,), ("conv", "bn"), FusedConvNormAct),
    Rule("Cream", "Conv2d_BN", None, ("c", "bn"), FusedConvNormAct),
    Rule("timm", "NormLinear", (TIMM_MSRA,), ("bn", "drop", "linear"), FusedNormLinear),
    Rule("Cream", "BN_Linear", None, ("bn", "l"), FusedNormLinear),
)
_RULE_CLASS_NAMES = {rule.class_name for rule in RULES}


@dataclass
class PatchReport:
    """What :func:`patch` swapped (path, original class, replacement) and what it skipped (path, reason)."""

    swapped: list[tuple[str, str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def counts(self) -> Counter:
        return Counter(f"{original} -> {replacement}" for _, original, replacement in self.swapped)

    def __str__(self) -> str:
        lines = [f"patch: swapped {len(self.swapped)} modules"]
        lines += [f"  {n:>4} x {what}" for what, n in sorted(self.counts().items())]
        if self.skipped:
            lines.append(f"patch: left {len(self.skipped)} modules as they were")
            lines += [f"  {path}: {reason}" for path, reason in self.skipped]
        return "\n".join(lines)


def _match(module: nn.Module) -> tuple[Rule | None, str | None]:
    """The rule that applies to ``module``, or (None, reason) when its class name is one of ours but it does not
    fit, or (None, None) when it is simply not a module we handle."""
    name = type(module).__name__
    if name not in _RULE_CLASS_NAMES:
        return None, None
    reasons, declined = [], False
    for rule in RULES:
        if rule.class_name != name:
            continue
        if not rule.defined_here(module):
            reasons.append(f"{name} from {type(module).__module__} is not the {rule.family} class")
            continue
        missing = rule.missing(module)
        if missing:
            reasons.append(f"{name} lacks the {rule.family} attributes {missing}")
            continue
        if not rule.accepts(module):
            declined = True  # the right class, holding a block no rule handles: nothing to report
            continue
        return rule, None
    return None, None if declined else "; ".join(reasons)


def patch(model: nn.Module) -> PatchReport:
    """Swap, in place, every recognised module of ``model`` for its fused drop-in and report what happened.

    Parameters and buffers are shared (an optimizer built before patching keeps training the model), every
    ``state_dict`` key and shape is kept, and patching twice changes nothing. :func:`unpatch` reverts it.
    """
    if isinstance(model, FusedModule) or _match(model)[0] is not None:
        raise TypeError(f"patch() swaps the children of a model; {type(model).__name__} is itself a module it would "
                        "swap: patch the model containing it, or wrap it (e.g. nn.Sequential(module))")
    report = PatchReport()
    _patch_children(model, "", report)
    return report


def _patch_children(parent: nn.Module, prefix: str, report: PatchReport) -> None:
    for name, child in list(parent._modules.items()):
        if child is None:
            continue
        path = prefix + name
        if isinstance(child, FusedModule):
            if child.patch_inside:
                _patch_children(child, path + ".", report)
            continue
        rule, reason = _match(child)
        if rule is None:
            if reason:
                report.skipped.append((path, reason))
            _patch_children(child, path + ".", report)
            continue
        hooks = _bypassed_hooks(child)
        if hooks:
            report.skipped.append((path, f"{type(child).__name__}: {hooks}, which the fused module would not run "
                                         "(register hooks after patch, on the fused module)"))
            _patch_children(child, path + ".", report)
            continue
        try:
            fused = rule.replacement(child)
        except Unsupported as exc:
            report.skipped.append((path, f"{type(child).__name__}: {exc}"))
            _patch_children(child, path + ".", report)
            continue
        parent._modules[name] = fused
        report.swapped.append((path, f"{type(child).__module__}.{type(child).__name__}", type(fused).__name__))
        if fused.patch_inside:
            _patch_children(fused, path + ".", report)


def _bypassed_hooks(module: nn.Module) -> str | None:
    """What a fused replacement of ``module`` would silently skip: hooks or an instance-level ``forward`` on it or
    on a module inside it (a fused module computes its children itself); None when there is nothing."""
    for path, inner in module.named_modules():
        kinds = [kind for kind, hooks in (("forward hooks", inner._forward_hooks),
                                          ("forward pre-hooks", inner._forward_pre_hooks),
                                          ("backward hooks", inner._backward_hooks),
                                          ("backward pre-hooks", inner._backward_pre_hooks)) if hooks]
        if "forward" in inner.__dict__:
            kinds.append("an instance-level forward")
        if kinds:
            return f"{path or 'it'} has {' and '.join(kinds)}"
    return None


def unpatch(model: nn.Module) -> int:
    """Put back the original module objects that :func:`patch` replaced; returns how many."""
    restored = 0
    for name, child in list(model._modules.items()):
        if child is None:
            continue
        restored += unpatch(child)
        if isinstance(child, FusedModule):
            model._modules[name] = child.restore()
            restored += 1
    return restored


@torch.no_grad()
def fold_bn(model: nn.Module) -> int:
    """Fold, destructively and in place, every BatchNorm of the recognised conv and linear containers (patched or
    not) into the layer next to it and replace it by ``nn.Identity``; returns how many were folded.

    The classic inference-only transform: the BatchNorm parameters and statistics are gone from the model and
    its ``state_dict`` afterwards, and conv layers gain a bias. :func:`patch` folds without destroying anything.
    """
    folded = 0
    for module in model.modules():
        original = module.original if isinstance(module, FusedModule) else module
        rule, _ = _match(original)
        if rule is None or rule.replacement not in (FusedConvNormAct, FusedNormLinear):
            continue
        layer_name, norm_name = _FOLD_PAIRS[rule.class_name]
        layer, norm = getattr(module, layer_name), getattr(module, norm_name)
        if not uses_running_stats(norm):
            continue
        if rule.replacement is FusedNormLinear:
            weight, bias = fold_bn_before_linear(layer.weight, layer.bias, norm)
        else:
            weight, bias = fold_bn_into(layer.weight, layer.bias, norm)
        layer.weight = nn.Parameter(weight, requires_grad=layer.weight.requires_grad)
        layer.bias = nn.Parameter(bias, requires_grad=layer.weight.requires_grad)
        setattr(module, norm_name, nn.Identity())
        if module is not original:
            setattr(original, norm_name, nn.Identity())
        folded += 1
    return folded


_FOLD_PAIRS = {  # class name -> (layer attribute, BatchNorm attribute)
    "ConvNormAct": ("conv", "norm"), "ConvLayer": ("conv", "norm"), "ConvNorm": ("conv", "bn"),
    "Conv2d_BN": ("c", "bn"), "NormLinear": ("linear", "bn"), "BN_Linear": ("l", "bn"),
}
