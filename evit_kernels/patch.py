"""`patch(model)`: swap recognised modules of an existing model for fused drop-ins; `unpatch` reverts it.

Each fused class owns what it replaces (``MATCHES``, see :mod:`evit_kernels.nn._match`): a module is swapped only
when its class is defined where a match says (``type(m).__module__``), carries every attribute the match lists and
holds the children it names; the fused constructor then checks the configuration and refuses (``Unsupported``)
what it cannot compute exactly. The attention processors that diffusers' attention modules hold (``processor``, not a
module) are swapped the same way, by :data:`FUSED_PROCESSORS`. This module only walks the model and asks those
classes. Anything else is left untouched, and the report says why when the class name looked like ours.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from evit_kernels import dispatch
from evit_kernels.nn._base import FusedModule, FusedProcessor, Unsupported, unfused
from evit_kernels.nn._fold import uses_running_stats
from evit_kernels.nn._match import recognise
from evit_kernels.nn.cascaded_group_attention import FusedCascadedGroupAttention, FusedLocalWindowAttention
from evit_kernels.nn.conv_block import FusedConvBlock
from evit_kernels.nn.conv_bn_act import FusedConvNormAct, FusedResidualConvNorm
from evit_kernels.nn.ffn import FusedResidualFFN
from evit_kernels.nn.glumbconv import FusedGLUMBConv
from evit_kernels.nn.lite_mla import FusedLiteMLA, FusedSanaMultiscaleLinearAttention
from evit_kernels.nn.norm_linear import FusedNormLinear
from evit_kernels.nn.patch_layers import FusedPatchEmbedding, FusedPatchMerging
from evit_kernels.nn.residual_block import FusedResidualBlock
from evit_kernels.nn.rms_norm import FusedLayerNorm2d, FusedRMSNorm, FusedTritonRMSNorm2d
from evit_kernels.nn.sana_attention import (
    FusedPAGCFGSanaLinearAttnProcessor,
    FusedPAGIdentitySanaLinearAttnProcessor,
    FusedSanaLinearAttnProcessor,
    FusedSanaVideoLinearAttnProcessor,
)

FUSED_CLASSES: tuple[type[FusedModule], ...] = (
    FusedLiteMLA, FusedLocalWindowAttention, FusedCascadedGroupAttention, FusedResidualFFN, FusedResidualConvNorm,
    FusedConvBlock, FusedResidualBlock, FusedGLUMBConv, FusedConvNormAct, FusedNormLinear, FusedRMSNorm,
    FusedSanaMultiscaleLinearAttention, FusedPatchMerging, FusedPatchEmbedding, FusedTritonRMSNorm2d, FusedLayerNorm2d,
)
"""The drop-ins :func:`patch` swaps in, each recognising its originals by its own ``MATCHES`` (tried in order)."""
_FUSED_CLASS_OF = {match: fused for fused in FUSED_CLASSES for match in fused.MATCHES}
FUSED_PROCESSORS: tuple[type[FusedProcessor], ...] = (FusedSanaLinearAttnProcessor, FusedSanaVideoLinearAttnProcessor,
                                                      FusedPAGCFGSanaLinearAttnProcessor,
                                                      FusedPAGIdentitySanaLinearAttnProcessor)
"""The drop-in attention processors :func:`patch` swaps into the attention modules holding their originals."""
_FUSED_PROCESSOR_OF = {match: fused for fused in FUSED_PROCESSORS for match in fused.MATCHES}


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


def _fused_class(module: nn.Module) -> tuple[type[FusedModule] | None, str | None]:
    """The fused class that replaces ``module``, or (None, reason) when its class name (or that of a child a match
    names) is one of ours but it does not fit, or (None, None) when it is simply not a module we handle."""
    match, reason = recognise(module, _FUSED_CLASS_OF)
    return (None, reason) if match is None else (_FUSED_CLASS_OF[match], None)


def patch(model: nn.Module, backend: str = "auto") -> PatchReport:
    """Swap, in place, every recognised module of ``model`` for its fused drop-in and report what happened.

    Parameters and buffers are shared (an optimizer built before patching keeps training the model), every
    ``state_dict`` key and shape is kept, and patching twice changes nothing. :func:`unpatch` reverts it.
    ``backend`` is each new fused module's ``backend`` (see :mod:`evit_kernels.dispatch`); a request it does not
    understand raises before anything is swapped.
    """
    dispatch.check_request(backend)
    if isinstance(model, FusedModule) or _fused_class(model)[0] is not None:
        raise TypeError(f"patch() swaps the children of a model; {type(model).__name__} is itself a module it would "
                        "swap: patch the model containing it, or wrap it (e.g. nn.Sequential(module))")
    report = PatchReport()
    _patch_children(model, "", backend, report)
    for path, module in model.named_modules():
        _patch_processor(module, path, backend, report)
    return report


def _patch_processor(module: nn.Module, path: str, backend: str, report: PatchReport) -> None:
    """Swap the attention processor that ``module`` holds, when one of :data:`FUSED_PROCESSORS` recognises it."""
    attribute = FusedProcessor.HOLDER_ATTRIBUTE
    processor = module.__dict__.get(attribute)  # a plain attribute: a processor that is a module is not ours
    if processor is None or isinstance(processor, FusedProcessor):
        return
    match, reason = recognise(processor, _FUSED_PROCESSOR_OF)
    where = f"{path}.{attribute}" if path else attribute
    if match is None:
        if reason:
            report.skipped.append((where, reason))
        return
    fused = _FUSED_PROCESSOR_OF[match](processor, backend)
    setattr(module, attribute, fused)
    report.swapped.append((where, f"{type(processor).__module__}.{type(processor).__name__}", type(fused).__name__))


def _patch_children(parent: nn.Module, prefix: str, backend: str, report: PatchReport) -> None:
    for name, child in list(parent._modules.items()):
        if child is None:
            continue
        path = prefix + name
        if isinstance(child, FusedModule):
            if child.patch_inside:
                _patch_children(child, path + ".", backend, report)
            continue
        fused_class, reason = _fused_class(child)
        if fused_class is None:
            if reason:
                report.skipped.append((path, reason))
            _patch_children(child, path + ".", backend, report)
            continue
        hooks = _bypassed_hooks(child)
        if hooks:
            report.skipped.append((path, f"{type(child).__name__}: {hooks}, which the fused module would not run "
                                         "(register hooks after patch, on the fused module)"))
            _patch_children(child, path + ".", backend, report)
            continue
        try:
            fused = fused_class(child, backend)
        except Unsupported as exc:
            report.skipped.append((path, f"{type(child).__name__}: {exc}"))
            _patch_children(child, path + ".", backend, report)
            continue
        parent._modules[name] = fused
        report.swapped.append((path, f"{type(child).__module__}.{type(child).__name__}", type(fused).__name__))
        if fused.patch_inside:
            _patch_children(fused, path + ".", backend, report)


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
    """Put back the original module and processor objects that :func:`patch` replaced; returns how many."""
    restored = 0
    for module in model.modules():
        processor = module.__dict__.get(FusedProcessor.HOLDER_ATTRIBUTE)
        if isinstance(processor, FusedProcessor):
            setattr(module, FusedProcessor.HOLDER_ATTRIBUTE, processor.restore())
            restored += 1
    return restored + _unpatch_modules(model)


def _unpatch_modules(model: nn.Module) -> int:
    restored = 0
    for name, child in list(model._modules.items()):
        if child is None:
            continue
        restored += _unpatch_modules(child)
        if isinstance(child, FusedModule):
            model._modules[name] = child.restore()
            restored += 1
    return restored


@torch.no_grad()
def fold_bn(model: nn.Module) -> int:
    """Fold, destructively and in place, every BatchNorm of the recognised conv and linear containers (patched or
    not; each fused class's ``BN_FOLD`` says which) into the layer next to it and replace it by ``nn.Identity``;
    returns how many were folded.

    The classic inference-only transform: the BatchNorm parameters and statistics are gone from the model and
    its ``state_dict`` afterwards, and conv layers gain a bias. :func:`patch` folds without destroying anything.
    """
    folded = 0
    for module in model.modules():
        fused_class, _ = _fused_class(unfused(module))
        if fused_class is not None and fused_class.BN_FOLD is not None:
            folded += _fold_container(module, fused_class)
    return folded


def _fold_container(module: nn.Module, fused_class: type[FusedModule]) -> int:
    """Fold the BatchNorm of ``module`` (one of ``fused_class``'s originals, or that class) as its ``BN_FOLD`` says,
    in the original too when ``module`` is fused; returns 1 when folded, 0 when it has no BatchNorm to fold."""
    layer_name, norm_name = fused_class.bn_fold_children(module)
    if layer_name is None or norm_name is None or not uses_running_stats(getattr(module, norm_name)):
        return 0
    layer, norm = getattr(module, layer_name), getattr(module, norm_name)
    weight, bias = fused_class.BN_FOLD.fold(layer.weight, layer.bias, norm)
    layer.weight = nn.Parameter(weight, requires_grad=layer.weight.requires_grad)
    layer.bias = nn.Parameter(bias, requires_grad=layer.weight.requires_grad)
    for container in {module, unfused(module)}:  # the fused module and its original (one module when not fused)
        setattr(container, norm_name, nn.Identity())
    return 1
