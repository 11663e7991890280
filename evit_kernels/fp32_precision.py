"""Whether PyTorch lets an fp32 op run on TF32 tensor cores: the kernels multiply fp32 tiles as the op they replace
would (docs/ops.md, "Tensor-core products"), and the performance model prices eager's ops the same way."""

from __future__ import annotations

import torch

OPS = ("conv", "matmul")
"""The kinds of PyTorch op a kernel's products replace: cuDNN convolutions, cuBLAS matmuls. Their TF32 settings
differ by default (on for convolutions, off for matmuls)."""


def tf32_allowed(op: str) -> bool:
    """Whether PyTorch runs its fp32 ``op`` ("conv" or "matmul") on TF32 tensor cores. PyTorch's own answer
    (``torch.backends.cudnn.allow_tf32``, ``torch.backends.cuda.matmul.allow_tf32``) where it gives one. Those
    getters raise where the ``fp32_precision`` settings of torch 2.9 and later disagree with what the legacy flags
    hold (``torch.backends.cuda.matmul.fp32_precision = "tf32"`` alone does it, as does
    ``torch.backends.cudnn.rnn.fp32_precision = "ieee"`` for cuDNN's); the ``fp32_precision`` settings then decide,
    as PyTorch's kernels read them: the op's own, else the CUDA backend's (``torch.backends.cudnn.fp32_precision``),
    else the global one, "none" deferring to the next; TF32 only where the first that is not "none" says "tf32"."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    legacy = torch.backends.cudnn if op == "conv" else torch.backends.cuda.matmul
    try:
        return bool(legacy.allow_tf32)
    except RuntimeError:
        pass
    own = torch.backends.cudnn.conv if op == "conv" else torch.backends.cuda.matmul
    for setting in (own, torch.backends.cudnn, torch.backends):
        if setting.fp32_precision != "none":
            return setting.fp32_precision == "tf32"
    return False
