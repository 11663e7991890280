"""What the kernel tests share: the error measures (flash-attention's criterion: a kernel's error is at most
about twice eager PyTorch's own error in the same dtype, above a floor that no machine's rounding can cross) and
the input layouts kernels must read."""

import torch


def max_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference, computed in float64 (NaN when either side has one, which fails any bound)."""
    return (got.double() - expected.double()).abs().max().item()


def rounding_floor(expected: torch.Tensor, dtype: torch.dtype, terms: int) -> float:
    """The error a correct kernel may have however eager happens to round, at the reference's largest magnitude
    ``m``: one unit in the last place of the output ``dtype`` (eager may round exactly where the kernel does not;
    the Triton interpreter truncates where a GPU rounds to nearest) plus ``4·sqrt(terms)`` float32 ulps for the
    fp32 accumulation, ``terms`` being the length of the longest chain of sums behind one output element (e.g.
    tokens + head dim for attention, C_in·k² for a conv). It depends on the shapes only, never on the machine's
    reduction order or thread count; see docs/validation.md."""
    m = expected.abs().max().item()
    return (torch.finfo(dtype).eps + 4 * terms**0.5 * torch.finfo(torch.float32).eps) * m


def assert_within_twice_eager(got: torch.Tensor, eager: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
                              terms: int, what: str = "output") -> None:
    """flash-attention's criterion: the kernel's error against the float64 ``expected`` is at most twice eager
    PyTorch's own error in the same ``dtype``, plus :func:`rounding_floor`. NaN never passes."""
    error, eager_error = max_err(got, expected), max_err(eager, expected)
    floor = rounding_floor(expected, dtype, terms)
    assert error <= 2 * eager_error + floor, (f"{what}: error {error:.3g} > 2 x eager's {eager_error:.3g} "
                                              f"+ floor {floor:.3g} ({dtype}, {terms} terms)")


def tf32_exact(t: torch.Tensor) -> torch.Tensor:
    """``t`` (fp32) with the 13 low mantissa bits cleared: values TF32 holds exactly (10 explicit mantissa bits), so
    that a TF32 product of two of them is exact however the hardware rounds its operands."""
    return (t.view(torch.int32) & ~0x1FFF).view(torch.float32)


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
