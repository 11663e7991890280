"""BatchNorm folding for inference, computed from the live parameters and cached until one of them changes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@dataclass(frozen=True)
class BatchNormFold:
    """How :func:`evit_kernels.fold_bn` folds a container destructively: the BatchNorm child playing role ``norm``
    into the layer child playing role ``layer`` (roles of the fused class's ``CHILD_ROLES``), computed by ``fold``
    (:func:`fold_bn_into` for a BatchNorm after the layer, :func:`fold_bn_before_linear` for one before)."""

    layer: str
    norm: str
    fold: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


def uses_running_stats(norm: nn.Module | None) -> bool:
    """True when ``norm`` is a BatchNorm that normalises with its running statistics (so it can be folded)."""
    return (isinstance(norm, _BatchNorm) and not norm.training and norm.track_running_stats
            and norm.running_mean is not None)


def foldable(norm: nn.Module | None) -> bool:
    """True when ``norm`` folds away: absent, an ``nn.Identity`` (what :func:`evit_kernels.fold_bn` leaves) or a
    BatchNorm on its running statistics."""
    return norm is None or isinstance(norm, nn.Identity) or uses_running_stats(norm)


def bn_scale_shift(bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` with ``bn(x) == x * scale + shift`` per channel in eval mode, in fp32 (fp64 for an
    fp64 BatchNorm)."""
    dtype = torch.promote_types(bn.running_var.dtype, torch.float32)
    scale = torch.rsqrt(bn.running_var.to(dtype) + bn.eps)
    shift = -bn.running_mean.to(dtype) * scale
    if bn.affine:
        scale = scale * bn.weight.to(dtype)
        shift = shift * bn.weight.to(dtype) + bn.bias.to(dtype)
    return scale, shift


def fold_bn_into(weight: torch.Tensor, bias: torch.Tensor | None, bn: _BatchNorm | None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight', bias')`` of the conv or linear layer followed by ``bn`` (output channels on dim 0).

    Computed in fp32 (fp64 for fp64) and returned in ``weight``'s dtype; ``bn`` None (or not foldable) returns
    the inputs.
    """
    if not uses_running_stats(bn):
        return weight, bias
    scale, shift = bn_scale_shift(bn)
    folded_w = weight.to(scale.dtype) * scale.view(-1, *([1] * (weight.dim() - 1)))
    folded_b = shift if bias is None else bias.to(scale.dtype) * scale + shift
    return folded_w.to(weight.dtype), folded_b.to(weight.dtype)


class FoldCache:
    """Caches folded tensors until a source tensor changes (in-place update, ``.to()``, a new dtype) or a
    constant in ``key`` does (e.g. ``bn.eps``).

    Folding is recomputed, never cached, under ``torch.compile`` (the compiler fuses it), when gradients
    must flow into the sources (eval-mode fine-tuning), so the cache can never hide a gradient, and when a
    source is an inference tensor (a model built under ``torch.inference_mode``), which has no version counter
    to tell an in-place update.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._value = None

    def fold(self, layers: list[tuple[nn.Module, nn.Module | None]],
             fold: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] | None = None
             ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """``[(weight', bias'), ...]`` of each (conv or linear layer, its :func:`foldable` norm) pair, folded by
        ``fold`` (default :func:`fold_bn_into`) and cached until one of the tensors or epsilons involved changes."""
        fold = fold or fold_bn_into
        norms = [norm if isinstance(norm, _BatchNorm) else None for _, norm in layers]
        sources = [t for (layer, _), norm in zip(layers, norms) for t in (layer.weight, layer.bias) + (
            () if norm is None else (norm.weight, norm.bias, norm.running_mean, norm.running_var))]
        return self.get(lambda: [fold(layer.weight, layer.bias, norm) for (layer, _), norm in zip(layers, norms)],
                        sources, key=tuple(None if norm is None else norm.eps for norm in norms))

    def get(self, compute: Callable[[], object], sources: list[torch.Tensor | None], key: tuple = ()) -> object:
        tensors = [t for t in sources if t is not None]
        if (torch.compiler.is_compiling() or any(t.is_inference() for t in tensors)
                or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))):
            return compute()
        # A freed address can come back for a new tensor (also at version 0): dtype and device tell those apart.
        full_key = (*key, *((t._version, t.data_ptr(), t.dtype, t.device) for t in tensors))
        if full_key != self._key:
            with torch.no_grad():
                self._value = compute()
            self._key = full_key
        return self._value


def fold_bn_before_linear(weight: torch.Tensor, bias: torch.Tensor | None, bn: _BatchNorm | None
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight', bias')`` with ``linear(bn(x), weight, bias) == linear(x, weight', bias')`` for (N, C) inputs:
    ``weight' = weight · diag(scale)``, ``bias' = bias + weight · shift`` (a BatchNorm1d before the linear layer).

    Computed in fp32 (fp64 for fp64) and returned in ``weight``'s dtype; ``bn`` None (or not foldable) returns
    the inputs.
    """
    if not uses_running_stats(bn):
        return weight, bias
    scale, shift = bn_scale_shift(bn)
    folded_w = weight.to(scale.dtype) * scale
    folded_b = weight.to(scale.dtype) @ shift
    if bias is not None:
        folded_b = folded_b + bias.to(scale.dtype)
    return folded_w.to(weight.dtype), folded_b.to(weight.dtype)
