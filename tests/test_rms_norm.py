"""evit::rms_norm against diffusers' RMSNorm (and, centered, mit-han-lab's LayerNorm2d), its Triton kernel on every
layout the channel norm meets, the FusedRMSNorm drop-in (its fused path and the cases it hands back to the original's
own forward), and the drop-ins for mit-han-lab's TritonRMSNorm2d and LayerNorm2d."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import evit_kernels
from evit_kernels import dispatch, predict
from evit_kernels.nn._base import Unsupported
from evit_kernels.nn.rms_norm import FusedRMSNorm
from evit_kernels.ops.rms_norm import RmsNormArgs, rms_norm, rms_norm_reference
from evit_kernels.triton import _common as triton_common
from evit_kernels.triton import rms_norm as triton_rms_norm
from tests.numerics import assert_within_twice_eager

RMSNorm = pytest.importorskip("diffusers.models.normalization").RMSNorm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
C = 12


def _norm(affine=True, bias=True, dtype=torch.float32, eps=1e-5):
    norm = RMSNorm(C, eps=eps, elementwise_affine=affine, bias=bias).to(DEVICE, dtype)
    with torch.no_grad():
        for p in norm.parameters():
            p.normal_()
    return norm


# The views a channel RMSNorm is applied to: an NCHW map's movedim(1, -1) (channel stride H·W), a channels-last
# map's (dense), a token-major (B, N, C) tensor, a strided slice of a map, and a single vector.
LAYOUTS = {
    "nchw": lambda: torch.randn(2, C, 5, 3).movedim(1, -1),
    "channels_last": lambda: torch.randn(2, C, 5, 3).contiguous(memory_format=torch.channels_last).movedim(1, -1),
    "tokens": lambda: torch.randn(2, 7, C),
    "strided": lambda: torch.randn(2, C, 6, 4)[..., ::2].movedim(1, -1),
    "vector": lambda: torch.randn(C),
}


@pytest.mark.parametrize("affine, bias", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_reference_is_diffusers_rms_norm_in_fp32(layout, affine, bias):
    norm = _norm(affine, bias)
    x = LAYOUTS[layout]().to(DEVICE)
    expected = norm(x)
    got = rms_norm(x, norm.weight, norm.bias, norm.eps, backend="torch")
    assert got.stride() == expected.stride()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.fixture(params=["32_rows", "8_rows"])
def rows_per_program(request, monkeypatch):
    """Both row blocks: the tests' tensors have few rows, so the 32-row block is forced by declaring no grid small."""
    if request.param == "32_rows":
        monkeypatch.setattr(triton_common, "SMS", 0)
    return request.param


def test_few_rows_take_smaller_row_blocks_and_split_their_channels():
    """32 rows per program where that makes at least a program per SM (132); else 8, and the channels split in
    slices of whole 64-channel steps until the programs make a full wave (16 per SM), at most 16 slices."""
    plan = triton_rms_norm.plan
    assert plan(256 * 32 * 32, 1024) == (32, 1)  # 8192 row blocks
    assert plan(300, 2304) == (8, 12)  # a Sana caption: 38 row blocks; 36 steps wanted 16 ways, 12 slices of 3
    assert plan(32 * 32, 1024) == (8, 16)  # a DC-AE map of 32x32: 128 row blocks, 16 steps
    assert plan(64 * 64, 512) == (8, 4)  # 512 row blocks want 5 slices of 8 steps: 4 slices of 2
    assert plan(300, C) == (8, 1)  # one step: nothing to split


@pytest.mark.numerics
@pytest.mark.parametrize("centered", [False, True], ids=["rms", "centered"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("affine, bias", [(True, True), (False, False)])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_triton_within_twice_eager_error(poisoned_empty, rows_per_program, layout, affine, bias, dtype, centered):
    norm = _norm(affine, bias, dtype)
    # centered: a mean well away from 0, which E[x²] - E[x]² would cancel
    x = (LAYOUTS[layout]() * 3 + (20 if centered else 0)).to(DEVICE, dtype)
    params = (norm.weight, norm.bias)
    expected = rms_norm_reference(RmsNormArgs(x.double(), *(None if p is None else p.double() for p in params),
                                              norm.eps, centered=centered))
    got = rms_norm(x, *params, norm.eps, centered=centered, backend="triton")
    eager = rms_norm(x, *params, norm.eps, centered=centered, backend="torch")
    assert got.dtype == dtype and got.stride() == eager.stride() and torch.isfinite(got).all()
    assert_within_twice_eager(got, eager, expected, dtype, terms=C)


WIDE = 200
"""Channels of the split tests: four 64-channel slices, the last of 8."""


SPLIT_CASES = {  # (shape, layout: "nchw" normalizes dimension 1 of the shape through movedim, grid of both kernels)
    "tokens": ((2, 15, WIDE), "tokens", (4, 4)),  # 30 rows in 4 blocks of 8
    "nchw": ((2, WIDE, 3, 5), "nchw", (4, 4)),
    # on a GPU, released shapes (their grids as the plan test above derives them)
    "sana_caption": pytest.param((1, 300, 2304), "tokens", (38, 12), marks=pytest.mark.gpu),
    "dc_ae_32x32": pytest.param((1, 1024, 32, 32), "nchw", (128, 16), marks=pytest.mark.gpu),
}


@pytest.mark.numerics
@pytest.mark.parametrize("centered", [False, True], ids=["rms", "centered"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape, layout, grid", list(SPLIT_CASES.values()), ids=list(SPLIT_CASES))
def test_split_channels_within_twice_eager_error(poisoned_empty, shape, layout, grid, dtype, centered):
    """Few rows of many channels: the statistics per channel slice, then each slice normalized with every slice's
    statistics combined (centered: a mean of 20 that a naive E[x²] - E[x]² would cancel), with weight, bias and a
    residual."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(*shape, generator=g) * 3 + (20 if centered else 0)
    x = (base.movedim(1, -1) if layout == "nchw" else base).to(DEVICE, dtype)
    channels = x.shape[-1]
    residual = torch.randn(x.shape, generator=g).to(DEVICE, dtype)
    weight, bias = (torch.randn(channels, generator=g).to(DEVICE, dtype) for _ in range(2))
    with predict.recorded_launches() as launches:
        rms_norm(x.to("meta"), weight.to("meta"), bias.to("meta"), 1e-5, residual=residual.to("meta"),
                 centered=centered, backend="triton")
    assert [(launch.kernel, launch.grid) for launch in launches] == [
        ("_rms_norm_stats_kernel", grid), ("_rms_norm_apply_kernel", grid)]
    doubled = [t.double() for t in (x, weight, bias, residual)]
    expected = rms_norm_reference(RmsNormArgs(*doubled[:3], 1e-5, doubled[3], centered))
    got = rms_norm(x, weight, bias, 1e-5, residual=residual, centered=centered, backend="triton")
    eager = rms_norm(x, weight, bias, 1e-5, residual=residual, centered=centered, backend="torch")
    assert got.dtype == dtype and got.stride() == eager.stride() and torch.isfinite(got).all()
    assert_within_twice_eager(got, eager, expected, dtype, terms=channels)


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "tokens"])
def test_residual_after_the_norm(poisoned_empty, layout, dtype):
    """DC-AE's GLUMBConv adds its input after the channel norm: ``norm(x) + residual``, the residual read through its
    own strides (here the other layout than x's where x is a map's channel view)."""
    norm = _norm(dtype=dtype)
    x = (LAYOUTS[layout]() * 3).to(DEVICE, dtype)
    other = {"nchw": "channels_last", "channels_last": "nchw"}.get(layout, layout)
    residual = LAYOUTS[other]().to(DEVICE, dtype)
    expected = rms_norm_reference(RmsNormArgs(x.double(), norm.weight.double(), norm.bias.double(), norm.eps))
    with torch.no_grad():
        expected, eager = expected + residual.double(), norm(x) + residual
    for backend in ("torch", "triton"):
        got = rms_norm(x, norm.weight, norm.bias, norm.eps, residual=residual, backend=backend)
        assert got.dtype == dtype and got.stride() == x.stride() and torch.isfinite(got).all()
        assert_within_twice_eager(got, eager, expected, dtype, terms=C, what=backend)
    with pytest.raises(ValueError, match="residual has shape"):
        rms_norm(x, norm.weight, norm.bias, norm.eps, residual=residual[..., :-1])


def test_triton_refuses_rows_it_cannot_walk_and_auto_passes_them_over(pretend_measured):
    x = torch.randn(2, 3, 5, 7, C).permute(0, 2, 1, 3, 4)  # leading strides that form three groups
    norm = _norm()
    reasons = dispatch.get("rms_norm", "triton").not_supported_reasons(RmsNormArgs(x, norm.weight, None, 1e-5))
    assert any("rows" in r for r in reasons)
    with pytest.raises(dispatch.BackendUnavailable, match="rows"):
        rms_norm(x, norm.weight, None, 1e-5, backend="triton")
    pretend_measured("rms_norm", "triton")
    norm.bias = None
    torch.testing.assert_close(rms_norm(x, norm.weight, None, 1e-5), norm(x))


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm(torch.randn(2, C), torch.ones(C + 1), None, 1e-5)
    with pytest.raises(TypeError, match="dtype"):
        rms_norm(torch.randn(2, C), torch.ones(C, dtype=torch.float16), None, 1e-5)


def test_opcheck_triton_backend():
    norm = _norm()
    x = LAYOUTS["nchw"]().to(DEVICE).requires_grad_()
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if DEVICE == "cpu":  # the interpreter cannot read the storage of the tensors AOT tracing hands the kernel
        tests = tests[:-1]
    residual = torch.randn_like(x, requires_grad=True)
    for centered in (False, True):
        torch.library.opcheck(torch.ops.evit.rms_norm, (x, norm.weight, norm.bias, 1e-5, residual, centered, "triton"),
                              test_utils=tests)


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_fused_module_matches_forward_and_gradients(backend, op_runs):
    norm = _norm()
    fused = FusedRMSNorm(copy.deepcopy(norm), backend)
    x = LAYOUTS["nchw"]().to(DEVICE).requires_grad_()
    expected, got = norm(x), fused(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(expected.square().sum(), [x, norm.weight, norm.bias])
    fused_grads = torch.autograd.grad(got.square().sum(), [x, fused.weight, fused.bias])
    for g, e in zip(fused_grads, grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert op_runs == [("rms_norm", "torch" if backend == "auto" else "triton")]


def test_fused_module_runs_the_original_where_its_dtype_rules_differ(op_runs):
    """fp16 input with fp32 weights gives the original's fp32 output; under autocast too."""
    norm = _norm()
    fused = FusedRMSNorm(copy.deepcopy(norm))
    x = LAYOUTS["tokens"]().to(DEVICE)
    for inputs in (x.half(), x.bfloat16()):
        expected = norm(inputs)
        got = fused(inputs)
        assert got.dtype == expected.dtype == torch.float32 and torch.equal(got, expected)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        assert torch.equal(fused(x), norm(x))
    assert op_runs == []


def test_fused_module_without_affine_and_refusals():
    norm = _norm(affine=False)
    fused = FusedRMSNorm(copy.deepcopy(norm))
    assert fused.weight is None and fused.bias is None
    x = LAYOUTS["channels_last"]().to(DEVICE)
    torch.testing.assert_close(fused(x), norm(x))
    with pytest.raises(Unsupported, match="one dimension"):
        FusedRMSNorm(RMSNorm((3, C), eps=1e-5))


class TritonRMSNorm2d(nn.LayerNorm):
    """mit-han-lab's TritonRMSNorm2d (efficientvit.models.nn.norm), whose Triton kernel allocates on "cuda" by name:
    the same math written in PyTorch (fp32, one rounding), under the original's class name and module."""

    def forward(self, x):
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight.float().view(1, -1, 1, 1) + self.bias.float().view(1, -1, 1, 1)
        return y.to(x.dtype)


TritonRMSNorm2d.__module__ = "efficientvit.models.nn.norm"


def _mit_han_lab_norm(affine=True):
    norm = TritonRMSNorm2d(C, eps=1e-5, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.normal_(1, 0.1)
            norm.bias.normal_(0, 0.1)
    return norm.to(DEVICE)


def test_mit_han_lab_triton_rms_norm_2d_in_low_precision_and_with_fp32_weights():
    original = _mit_han_lab_norm()
    fused = nn.Sequential(copy.deepcopy(original))
    evit_kernels.patch(fused)
    x = torch.randn(2, C, 5, 3, device=DEVICE)
    for dtype in (torch.float16, torch.bfloat16):  # fp32 weights, low-precision map: fp32 math, one rounding
        torch.testing.assert_close(fused(x.to(dtype)), original(x.to(dtype)), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\(B, 12, H, W\)"):
        fused(torch.randn(2, C + 1, 5, 3, device=DEVICE))


LayerNorm2d = pytest.importorskip("efficientsam.models.nn.norm").LayerNorm2d


def _mit_han_lab_layer_norm(affine=True):
    norm = LayerNorm2d(C, eps=1e-6, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.normal_(1, 0.5)
            norm.bias.normal_(0, 0.5)
    return norm.to(DEVICE)


def test_centered_reference_is_mit_han_lab_layer_norm_2d():
    norm = _mit_han_lab_layer_norm().double()
    x = torch.randn(2, C, 5, 3, dtype=torch.float64, device=DEVICE) * 3 + 20
    got = rms_norm(x.movedim(1, -1), norm.weight, norm.bias, norm.eps, centered=True, backend="torch").movedim(-1, 1)
    torch.testing.assert_close(got, norm(x), rtol=1e-12, atol=1e-12)


# (build, drop-in name, original class, mean of the test map, tolerance): mit-han-lab's channel norms of NCHW maps.
CHANNEL_NORMS_2D = {
    "triton_rms_norm_2d": (_mit_han_lab_norm, "FusedTritonRMSNorm2d", TritonRMSNorm2d, 0, 1e-6),
    "layer_norm_2d": (_mit_han_lab_layer_norm, "FusedLayerNorm2d", LayerNorm2d, 20, 1e-5),
}


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("norm", list(CHANNEL_NORMS_2D))
def test_mit_han_lab_channel_norm_2d_is_swapped_and_matches(norm, backend, affine, op_runs):
    build, fused_name, original_class, mean, tol = CHANNEL_NORMS_2D[norm]
    original = build(affine)
    holder = nn.Sequential(copy.deepcopy(original))
    report = evit_kernels.patch(holder, backend=backend)
    assert type(holder[0]).__name__ == fused_name, str(report)
    assert holder.state_dict().keys() == nn.Sequential(original).state_dict().keys()
    x = torch.randn(2, C, 5, 3, device=DEVICE) * 3 + mean
    for inputs in (x, x.contiguous(memory_format=torch.channels_last)):
        got = holder(inputs)
        assert got.stride() == inputs.stride() == original(inputs).stride()
        torch.testing.assert_close(got, original(inputs), rtol=tol, atol=tol)
    assert op_runs == [("rms_norm", "torch" if backend == "auto" else "triton")] * 2
    if affine:  # training: the reference's gradients, for x and both parameters
        xs = [x.clone().requires_grad_() for _ in range(2)]
        grad = torch.randn_like(x)
        for module, xi in zip((original, holder), xs, strict=True):
            module(xi).backward(grad)
        torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=10 * tol, atol=tol)
        for p_fused, p_original in zip(holder.parameters(), original.parameters(), strict=True):
            torch.testing.assert_close(p_fused.grad, p_original.grad, rtol=10 * tol, atol=tol)
    evit_kernels.unpatch(holder)
    assert type(holder[0]) is original_class


def test_mit_han_lab_layer_norm_2d_keeps_the_original_dtypes():
    """fp32 weights on a bf16 map give an fp32 map, as the original's product with them does (here computed in fp32
    from the bf16 values, one rounding); under autocast nothing is cast that the original would not cast."""
    original = _mit_han_lab_layer_norm()
    fused = nn.Sequential(copy.deepcopy(original))
    evit_kernels.patch(fused)
    x = torch.randn(2, C, 5, 3, device=DEVICE).to(torch.bfloat16)
    exact = original.double()(x.double())
    original.float()
    got = fused(x)
    assert got.dtype == original(x).dtype == torch.float32
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got, expected = fused(x.float()), original(x.float())
    assert got.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\(B, 12, H, W\)"):
        fused(torch.randn(2, C + 1, 5, 3, device=DEVICE))
