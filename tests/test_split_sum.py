"""The summing kernel of split reductions (evit_kernels/triton/split_sum.py) against a float64 sum of the same
partial sums: every layout of the output and the residual it takes, and one it can only write through a copy."""

from __future__ import annotations

import pytest
import torch

from evit_kernels.triton import _common as triton_common
from evit_kernels.triton import split_sum
from tests.numerics import in_layout

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# (batch, channels, H, W, slices, out layout, residual layout or None): an output count no multiple of the block,
# one slice short of the most, a 1×1 map, one channel, an output with adjacent channels but dense in no layout, an
# fp32 residual broadcast from one value per channel.
CASES = {
    "nchw": (2, 5, 3, 7, 3, "nchw", "nchw"),
    "channels_last": (1, 12, 5, 5, 15, "channels_last", "channels_last"),
    "residual_in_the_other_layout": (2, 6, 4, 3, 4, "nchw", "channels_last"),
    "out_dense_in_neither_layout": (1, 7, 3, 5, 2, "strided", "nchw"),
    "map_1x1_no_residual": (3, 9, 1, 1, 16, "channels_last", None),
    "one_channel": (2, 1, 4, 9, 5, "nchw", "strided"),
    "out_strided_channels_last": (2, 6, 3, 4, 3, "strided_channels_last", "channels_last"),
    "residual_broadcast": (1, 8, 4, 4, 2, "nchw", "broadcast"),
}


def test_programs_take_64_outputs_from_half_a_wave_of_them_up():
    assert split_sum.block(16 * 384) == split_sum.SMALL_BLOCK  # M4's FFNs at batch 1: 96 programs of 64
    assert split_sum.block(64 * (4 * 132 - 1)) == split_sum.SMALL_BLOCK  # 527 programs of 64
    assert split_sum.block(64 * (4 * 132 - 1) + 16) == split_sum.BLOCK  # 528, the last one short
    assert split_sum.block(49 * 1024) == split_sum.BLOCK  # L3's stage-4 projections at batch 1: 784 programs
    assert split_sum.block(81 * 500) == split_sum.SMALL_BLOCK  # 633 programs, but no multiple of 16: 4-byte loads


def test_partial_sums_not_made_for_the_output_are_refused():
    out = torch.empty(2, 3, 4, 5)
    with pytest.raises(ValueError, match="split_sum.partials"):
        split_sum.add(torch.empty(6, 3, 4, 10)[..., ::2], None, None, out, "none")
    with pytest.raises(ValueError, match="split_sum.partials"):
        split_sum.add(torch.empty(5, 3, 4, 5), None, None, out, "none")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("sms", [0, 10**6], ids=["64_outputs_a_program", "16_outputs_a_program"])
def test_the_slices_bias_activation_and_residual_add_up_in_any_layout(poisoned_empty, monkeypatch, sms, name, dtype):
    """Both program sizes (:func:`split_sum.block`, forced through the SM count on these small tensors; 64 outputs a
    program only where the outputs are a multiple of 16: 144, 144 and 128 of them in three cases, the last program
    short in the first two)."""
    monkeypatch.setattr(triton_common, "SMS", sms)
    batch, channels, height, width, slices, out_layout, residual_layout = CASES[name]
    generator = torch.Generator().manual_seed(0)

    def laid_out(t: torch.Tensor, layout: str, dtype: torch.dtype = dtype) -> torch.Tensor:
        t = t.to(DEVICE, dtype)
        if layout == "strided_channels_last":  # channels adjacent (stride 1), dense in neither layout
            wide = torch.cat([t, t], dim=3).contiguous(memory_format=torch.channels_last)
            return wide[..., ::2].copy_(t)
        if layout == "broadcast":  # one value per channel, zero strides elsewhere
            return t[:1, :, :1, :1].expand(t.shape)
        return in_layout(t, layout)

    shape = (batch, channels, height, width)
    out = laid_out(torch.zeros(shape), out_layout)
    sums = split_sum.partials(out, slices)
    sums.copy_(torch.randn(sums.shape, generator=generator))
    bias = torch.randn(channels, generator=generator).to(DEVICE, dtype)
    residual = None
    if residual_layout is not None:
        # In the broadcast case an fp32 residual (with a bf16 output too), as the ops allow.
        residual_dtype = torch.float32 if residual_layout == "broadcast" else dtype
        residual = laid_out(torch.randn(shape, generator=generator), residual_layout, residual_dtype)

    result = split_sum.add(sums, bias, residual, out, "hardswish")

    total = sums.double().reshape(slices, *shape).sum(0) + bias.double()[:, None, None]
    expected = total * (total + 3).clamp(0, 6) / 6
    if residual is not None:
        expected += residual.double()
    assert result is out
    # One conversion to the output dtype (to nearest on a GPU; the interpreter's bf16 conversion truncates, up to one
    # unit in the last place, 2^-7 of the value), and an fp32 sum of at most 16 values of about 1 (off by at most
    # about 1e-5, in any order of the additions): a slice, bias or residual left out would be off by about 1.
    tolerance = {"rtol": 2 ** -7, "atol": 1e-4} if dtype == torch.bfloat16 else {"rtol": 1e-6, "atol": 1e-4}
    torch.testing.assert_close(out.double(), expected, **tolerance)
