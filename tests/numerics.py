"""The error measures the kernel tests share (flash-attention's criterion: a kernel's error is at most about
twice eager PyTorch's own error in the same dtype)."""

import torch


def max_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference, computed in float64."""
    return (got.double() - expected.double()).abs().max().item()


def ulp(expected: torch.Tensor, dtype: torch.dtype) -> float:
    """One unit in the last place of ``dtype`` at the largest magnitude: the floor of the 2x-eager criterion, for
    cases where eager happens to round exactly (the Triton interpreter also truncates when it narrows to bf16,
    where a GPU rounds to nearest)."""
    return torch.finfo(dtype).eps * expected.abs().max().item()
