"""What the kernel tests share: the error measures (flash-attention's criterion: a kernel's error is at most
about twice eager PyTorch's own error in the same dtype) and the input layouts kernels must read."""

import torch


def max_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference, computed in float64."""
    return (got.double() - expected.double()).abs().max().item()


def ulp(expected: torch.Tensor, dtype: torch.dtype) -> float:
    """One unit in the last place of ``dtype`` at the largest magnitude: the floor of the 2x-eager criterion, for
    cases where eager happens to round exactly (the Triton interpreter also truncates when it narrows to bf16,
    where a GPU rounds to nearest)."""
    return torch.finfo(dtype).eps * expected.abs().max().item()


def assert_same_grads_and_buffers(original: torch.nn.Module, fused: torch.nn.Module) -> None:
    """After the same training steps: the same parameter gradients and buffers, under the same names."""
    for (name_o, p_o), (name_f, p_f) in zip(original.named_parameters(), fused.named_parameters(), strict=True):
        assert name_o == name_f
        torch.testing.assert_close(p_f.grad, p_o.grad, rtol=1e-5, atol=1e-5)
    for (name_o, b_o), (name_f, b_f) in zip(original.named_buffers(), fused.named_buffers(), strict=True):
        assert name_o == name_f
        torch.testing.assert_close(b_f, b_o, rtol=1e-5, atol=1e-6)


def in_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t`` as "contiguous", "channels_last", or "strided": every other column of a wider tensor, which has no
    dense layout at all."""
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        wide = torch.empty(*t.shape[:3], 2 * t.shape[3], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.contiguous()


def poison_next_allocation(shape, dtype) -> int:
    """Leave a NaN-filled block of this size in the caching allocator, which hands it to the next allocation of
    the same size (the kernel's output, allocated in C++ where the poisoned_empty fixture cannot reach). The
    cache is emptied first so that no other free block of that size comes first; callers check the address."""
    torch.cuda.empty_cache()
    block = torch.full(shape, float("nan"), device="cuda", dtype=dtype)
    address = block.data_ptr()
    del block
    return address
