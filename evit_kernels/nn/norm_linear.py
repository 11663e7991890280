"""``FusedNormLinear``: BatchNorm1d → (dropout) → linear heads, timm ``efficientvit_msra.NormLinear`` (``bn``,
``drop``, ``linear``) and Cream ``BN_Linear`` (``bn``, ``l``), as one linear layer with the BatchNorm folded in
whenever the BatchNorm normalises with its running statistics."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.dropout import _DropoutNd

from evit_kernels.nn._base import FusedModule, Unsupported
from evit_kernels.nn._fold import BatchNormFold, FoldCache, fold_bn_before_linear, foldable
from evit_kernels.nn._match import TIMM_MSRA, Match


class FusedNormLinear(FusedModule):
    """Drop-in for BatchNorm1d → dropout → linear on (N, C) inputs.

    Eval (BatchNorm on running statistics, dropout inactive, 2-D input): one ``F.linear`` with the BatchNorm
    folded into its weight and bias (cached until a parameter, buffer or ``bn.eps`` changes). Anything else:
    the original's children in the original's order.
    """

    MATCHES = (Match("timm", "NormLinear", (TIMM_MSRA,), ("bn", "drop", "linear")),
               Match("Cream", "BN_Linear", None, ("bn", "l")))
    CHILD_ROLES = {"norm": ("bn",), "dropout": ("drop",), "linear": ("linear", "l")}
    BN_FOLD = BatchNormFold("linear", "norm", fold_bn_before_linear)

    def __init__(self, original: nn.Module, backend: str = "auto"):
        super().__init__(original, backend)
        self._bind_roles("norm + linear")
        norm, dropout, linear = (self._child(role) for role in self.CHILD_ROLES)
        if not isinstance(norm, (nn.BatchNorm1d, nn.SyncBatchNorm)):
            raise Unsupported(f"expected a BatchNorm1d child, got {norm!r}")
        if type(linear) is not nn.Linear:
            raise Unsupported(f"expected a plain nn.Linear child, got {linear!r}")
        if norm.num_features != linear.in_features:
            raise Unsupported(f"BatchNorm1d has {norm.num_features} features but the linear layer takes "
                              f"{linear.in_features}")
        if dropout is not None and not isinstance(dropout, _DropoutNd):
            raise Unsupported(f"expected a dropout child, got {dropout!r}")
        self._fold_cache = FoldCache()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm, dropout, linear = (self._child(role) for role in self.CHILD_ROLES)
        dropout_active = isinstance(dropout, _DropoutNd) and dropout.training and dropout.p > 0
        if x.dim() == 2 and foldable(norm) and not dropout_active:
            (weight, bias), = self._fold_cache.fold([(linear, norm)], fold_bn_before_linear)
            return F.linear(x, weight, bias)
        for child in (norm, dropout):  # the original sequence, less what fold_bn may have replaced by Identity
            if child is not None:
                x = child(x)
        return linear(x)
