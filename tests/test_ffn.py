"""evit::ffn (the EfficientViT-M feed-forward block, residual included) and FusedResidualFFN: both backends
against a float64 reference (Triton on CPU through the interpreter on tiny grids), the drop-in module against timm
``ResidualDrop(ConvMlp)`` and Cream ``Residual(FFN)`` in eval and training, and a patched efficientvit_m0."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.efficientvit_msra import ConvMlp, ConvNorm, ResidualDrop
from torch import nn

import evit_kernels
from evit_kernels import dispatch
from evit_kernels.nn import ffn as fused_module_file
from evit_kernels.nn._base import Unsupported
from evit_kernels.nn.conv_bn_act import FusedConvNormAct
from evit_kernels.nn.ffn import FusedResidualFFN
from evit_kernels.ops.ffn import FfnArgs, ffn, ffn_reference
from evit_kernels.triton import _common as triton_common
from tests.cream_style import FFN, Residual
from tests.models import randomize_bn, with_child
from tests.numerics import (
    assert_same_grads_and_buffers,
    assert_within_twice_eager,
    in_layout,
    rounding_floor,
    tf32_exact,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]

# (batch, C, H, W, layout, biases, residual): odd pixel counts over one and several pixel blocks, C not a power of 2.
SHAPES = {
    "c16_nchw": (1, 16, 3, 5, "nchw", True, True),
    "c24_channels_last_no_bias": (2, 24, 7, 3, "channels_last", False, True),
    "c64_nchw_no_residual": (1, 64, 5, 13, "nchw", True, False),
    "c24_strided": (2, 24, 3, 5, "strided", True, True),
    # A small map: the 96 output channels are split over two programs (ffn kernel, fewer pixel tiles than SMs).
    "c96_small_map_channel_blocks": (1, 96, 3, 4, "nchw", True, True),
    # A small map with 576 hidden channels: split into slices (9 of 2 steps in fp16/bf16; 12 of 3 in fp32) whose
    # sums a second launch adds with b2 and the residual.
    "c288_small_map_hidden_split": (1, 288, 3, 4, "channels_last", True, True),
}


def _inputs(name: str, dtype: torch.dtype) -> tuple:
    batch, channels, height, width, layout, biases, residual = SHAPES[name]
    hidden = 2 * channels
    x = in_layout(torch.randn(batch, channels, height, width, device=DEVICE), layout)
    w1 = torch.randn(hidden, channels, 1, 1, device=DEVICE) / channels ** 0.5
    w2 = torch.randn(channels, hidden, 1, 1, device=DEVICE) / hidden ** 0.5
    b1, b2 = (torch.randn(n, device=DEVICE) if biases else None for n in (hidden, channels))
    r = in_layout(torch.randn(batch, channels, height, width, device=DEVICE), layout) if residual else None
    return tuple(None if t is None else t.to(dtype) for t in (x, w1, b1, w2, b2, r))


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", SHAPES)
def test_within_twice_eager_error(poisoned_empty, name, dtype):
    args = _inputs(name, dtype)
    out = ffn(*args, backend="triton")
    eager = ffn_reference(FfnArgs(*args))
    expected = ffn_reference(FfnArgs(*(None if t is None else t.double() for t in args)))
    assert out.dtype == dtype and out.shape == eager.shape and out.stride() == eager.stride()
    assert torch.isfinite(out).all()
    channels, hidden = args[1].shape[1], args[1].shape[0]
    assert_within_twice_eager(out, eager, expected, dtype, channels + hidden)


@pytest.mark.numerics
def test_256_channel_blocks_split_in_two_for_64_pixel_tiles(poisoned_empty, monkeypatch):
    from evit_kernels import predict
    from evit_kernels.triton import _common as triton_common
    from evit_kernels.triton import ffn as triton_ffn

    # M4's 256-channel FFNs at batch 256: two 128-wide blocks of 64-pixel tiles (wgmma) in fp16/bf16; fp32 keeps one.
    assert triton_ffn.output_block(256, 256 * 7 * 7, torch.bfloat16) == 128
    assert triton_ffn.output_block(256, 256 * 7 * 7, torch.float32) == 256
    monkeypatch.setattr(triton_common, "SMS", 0)  # a small map, without the small-grid split
    g = torch.Generator().manual_seed(0)
    x, w1, b1, w2, b2, r = (torch.randn(*shape, generator=g) * scale for shape, scale in (
        ((1, 200, 3, 5), 1.0), ((400, 200, 1, 1), 200 ** -0.5), ((400,), 1.0), ((200, 400, 1, 1), 400 ** -0.5),
        ((200,), 1.0), ((1, 200, 3, 5), 1.0)))
    args = tuple(t.to(DEVICE, torch.bfloat16) for t in (x, w1, b1, w2, b2, r))
    with predict.recorded_launches() as launches:
        ffn(*(t.to("meta") for t in args), backend="triton")
    (launch,) = launches
    assert launch.grid[1] == 2 and launch.constexprs["BLOCK_C"] == 128 and launch.constexprs["BLOCK_M"] == 64
    out = ffn(*args, backend="triton")
    eager = ffn_reference(FfnArgs(*args))
    expected = ffn_reference(FfnArgs(*(t.double() for t in args)))
    assert_within_twice_eager(out, eager, expected, torch.bfloat16, 200 + 400)


def test_small_maps_split_the_output_channels_over_programs():
    from evit_kernels import predict

    with torch.device("meta"):
        small = [torch.empty(1, 96, 3, 4), torch.empty(192, 96, 1, 1), None, torch.empty(96, 192, 1, 1), None, None]
        large = [torch.empty(64, 96, 28, 28), *small[1:]]
    with predict.recorded_launches() as launches:
        ffn(*small, backend="triton")
        ffn(*large, backend="triton")
    assert [launch.grid[1] for launch in launches] == [2, 1]
    assert launches[0].constexprs["BLOCK_C"] == 64 and launches[1].constexprs["BLOCK_C"] == 128


def test_few_programs_split_long_hidden_dimensions():
    """docs/performance.md, "Split-K": M4's stage-3 block at batch 1 (16 pixels, 384 channels, 768 hidden) splits
    its hidden channels; its stage-1 block (256 hidden) and a batch-256 map do not."""
    from evit_kernels import predict
    from evit_kernels.triton import ffn as triton_ffn

    assert triton_ffn.hidden_splits(6, 768, 32) == 12
    assert triton_ffn.hidden_splits(4, 512, 32) == 8
    assert triton_ffn.hidden_splits(8, 256, 32) == 1  # too short to gain a second launch
    assert triton_ffn.hidden_splits(200, 768, 32) == 1  # enough programs
    assert triton_ffn.hidden_splits(100, 4096, 32) == 5  # up to 4 · 132 programs (1×1 convs aim at 6 · 132)

    def launched(batch, side, channels):
        with torch.device("meta"):
            x = torch.empty(batch, channels, side, side, dtype=torch.bfloat16)
            w1 = torch.empty(2 * channels, channels, 1, 1, dtype=torch.bfloat16)
            w2 = torch.empty(channels, 2 * channels, 1, 1, dtype=torch.bfloat16)
        with predict.recorded_launches() as launches:
            ffn(x, w1, None, w2, None, x, backend="triton")
        return [(launch.kernel, launch.grid) for launch in launches]

    assert launched(1, 4, 384) == [("_ffn_fwd_kernel", (1, 6, 12)), ("_split_sum_kernel", (384,))]
    assert launched(1, 14, 128) == [("_ffn_fwd_kernel", (4, 2))]
    assert launched(256, 4, 384) == [("_ffn_fwd_kernel", (256, 1))]  # one 512-wide block, 16-pixel tiles


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("side, channels", [(7, 256), (4, 384)], ids=["m4_stage2", "m4_stage3"])
def test_batch_1_hidden_split_on_gpu(poisoned_empty, side, channels, dtype):
    """EfficientViT-M4's stage-2 and stage-3 blocks at batch 1, 224 px: 512 and 768 hidden channels, split 8 and
    12 ways."""
    g = torch.Generator().manual_seed(0)
    hidden = 2 * channels
    x, w1, b1, w2, b2 = (torch.randn(*shape, generator=g) * scale for shape, scale in (
        ((1, channels, side, side), 1.0), ((hidden, channels, 1, 1), channels ** -0.5), ((hidden,), 1.0),
        ((channels, hidden, 1, 1), hidden ** -0.5), ((channels,), 1.0)))
    args = tuple(t.to(DEVICE, dtype) for t in (x, w1, b1, w2, b2, x))
    out = ffn(*args, backend="triton")
    eager = ffn_reference(FfnArgs(*args))
    expected = ffn_reference(FfnArgs(*(t.double() for t in args)))
    assert_within_twice_eager(out, eager, expected, dtype, channels + hidden)


@pytest.mark.gpu
@pytest.mark.parametrize("batch, side, channels", [(8, 14, 128), (1, 4, 384)],
                         ids=["m4_stage1_batch8", "m4_stage3_hidden_split"])
def test_tf32_products_within_tf32_rounding_on_gpu(poisoned_empty, batch, side, channels):
    """fp32 where PyTorch allows cuDNN TF32 (its default; the other tests turn it off), so the kernel multiplies on
    TF32 tensor cores. On TF32-exact x, w1 and w2 the first product is exact; the kernel rounds the hidden map to
    TF32 (10 explicit mantissa bits, truncated or rounded: a relative error under 2^-10) for the second, so each
    output is off by under 2^-10 · Σ|h|·|w2|, plus fp32 accumulation (a second 2^-10 of margin covers it): a bound
    from the inputs alone, which a wrong build or a misplaced tile exceeds."""
    g = torch.Generator().manual_seed(0)
    hidden = 2 * channels
    x, w1, b1, w2, b2 = (tf32_exact(torch.randn(*shape, generator=g) * scale) for shape, scale in (
        ((batch, channels, side, side), 1.0), ((hidden, channels, 1, 1), channels ** -0.5), ((hidden,), 1.0),
        ((channels, hidden, 1, 1), hidden ** -0.5), ((channels,), 1.0)))
    args = tuple(t.to(DEVICE) for t in (x, w1, b1, w2, b2, x))
    torch.backends.cudnn.allow_tf32 = True  # the autouse fixture restores IEEE's setting for the next test
    assert triton_common.dot_mode(torch.float32, "conv")["PRECISION"] == "tf32"
    out = ffn(*args, backend="triton")
    x64, w1_64, b1_64, w2_64, _, _ = (t.double() for t in args)
    expected = ffn_reference(FfnArgs(*(t.double() for t in args)))
    spread = F.conv2d(F.relu(F.conv2d(x64, w1_64, b1_64)).abs(), w2_64.abs())
    assert torch.isfinite(out).all()
    excess = (out.double() - expected).abs() - (2 * 2.0**-10 * spread + rounding_floor(expected, torch.float32,
                                                                                         channels + hidden))
    assert excess.max().item() <= 0, f"error exceeds the TF32 bound by up to {excess.max().item():.3g}"


def test_reference_gradients_after_triton_forward():
    args = _inputs("c24_channels_last_no_bias", torch.float32)
    args = (args[0], args[1], torch.randn(48, device=DEVICE), args[3], torch.randn(24, device=DEVICE), args[5])
    leaves = [t.detach().clone().requires_grad_() for t in args]
    ffn(*leaves, backend="triton").sum().backward()  # a stride-0 grad_output
    exact = [t.detach().double().requires_grad_() for t in args]
    ffn_reference(FfnArgs(*exact)).sum().backward()
    for got, ref in zip(leaves, exact):
        torch.testing.assert_close(got.grad.double(), ref.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend):
    args = [t.requires_grad_() for t in _inputs("c16_nchw", torch.float32)]
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if DEVICE == "cpu" and backend == "triton":  # the interpreter cannot read the storage AOT tracing hands it
        tests = tests[:-1]
    torch.library.opcheck(torch.ops.evit.ffn.default, (*args, backend), test_utils=tests)


def test_invalid_arguments_raise_clear_errors():
    x, w1, b1, w2, b2, r = _inputs("c16_nchw", torch.float32)
    with pytest.raises(ValueError, match="w1 must be"):
        ffn(x, w1[:, :8], b1, w2, b2)
    with pytest.raises(ValueError, match="w2 must be"):
        ffn(x, w1, b1, w2[:, :8], b2)
    with pytest.raises(ValueError, match="b1 must have shape"):
        ffn(x, w1, b2, w2, b2)
    with pytest.raises(ValueError, match="residual has shape"):
        ffn(x, w1, b1, w2, b2, r[:, :, :2])
    with pytest.raises(TypeError, match="w2 has dtype"):
        ffn(x, w1, b1, w2.half(), b2)


def test_unsupported_inputs_raise_on_request_and_fall_back_under_auto(pretend_measured):
    wide = (torch.randn(1, 520, 2, 3, device=DEVICE), torch.randn(8, 520, 1, 1, device=DEVICE), None,
            torch.randn(520, 8, 1, 1, device=DEVICE), None, None)
    double = tuple(None if t is None else t.double() for t in _inputs("c16_nchw", torch.float32))
    for args, reason in ((wide, "520 channels"), (double, "float64")):
        with pytest.raises(dispatch.BackendUnavailable, match=reason):
            ffn(*args, backend="triton")
    pretend_measured("ffn", "triton")  # so that "auto" considers it: it must pass these inputs over
    for args in (wide, double):
        assert dispatch.choose(FfnArgs(*args)).name == "torch"
        torch.testing.assert_close(ffn(*args), ffn_reference(FfnArgs(*args)))
    assert dispatch.choose(FfnArgs(*_inputs("c16_nchw", torch.float32))).name == "triton"


def test_refuses_tensors_beyond_32_bit_indexing():
    x = torch.zeros(1, 1, 1, 1, device=DEVICE).expand(2**16, 16, 2**8, 2**8)  # 2^36 elements, no memory
    w1, w2 = torch.randn(32, 16, 1, 1, device=DEVICE), torch.randn(16, 32, 1, 1, device=DEVICE)
    with pytest.raises(dispatch.BackendUnavailable, match="2\\^31"):
        dispatch.choose(FfnArgs(x, w1, None, w2, None, None), "triton")


def _timm_block(channels=16):
    return ResidualDrop(ConvMlp(channels, 2 * channels))


def _cream_block(channels=16):
    return Residual(FFN(channels, 2 * channels))


@pytest.mark.parametrize("patch_children", [False, True], ids=["plain", "children_patched"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("build", [_timm_block, _cream_block], ids=["timm", "cream"])
@torch.no_grad()
def test_module_matches_original_in_eval(build, layout, backend, patch_children, op_runs):
    original = build().to(DEVICE)
    randomize_bn(original)
    original.eval()
    block = copy.deepcopy(original)
    if patch_children:  # what patch() does to pw1 / pw2 before or after wrapping them
        block.m.pw1, block.m.pw2 = FusedConvNormAct(block.m.pw1), FusedConvNormAct(block.m.pw2)
    fused = FusedResidualFFN(block, backend=backend).eval()
    x = in_layout(torch.randn(2, 16, 5, 3, device=DEVICE), layout)
    torch.testing.assert_close(fused(x), original(x), rtol=1e-5, atol=1e-5)
    assert op_runs == [("ffn", backend)]
    assert fused.state_dict().keys() == original.state_dict().keys()


@pytest.mark.parametrize("build, drop", [(_timm_block, 0.0), (_timm_block, 0.5), (_cream_block, 0.0)],
                         ids=["timm", "timm_drop", "cream"])  # Cream's Residual has no stochastic depth
def test_module_matches_original_in_training(build, drop, monkeypatch):
    """Batch statistics: the original runs, the op never does, and gradients and BN buffers match."""
    monkeypatch.setattr(fused_module_file, "ffn", lambda *args, **kwargs: pytest.fail("op called"))
    original = build().to(DEVICE)
    original.drop = drop
    randomize_bn(original)
    original.train()
    fused = FusedResidualFFN(copy.deepcopy(original)).train()
    x = torch.randn(4, 16, 3, 5, device=DEVICE)
    outputs = []
    for module in (original, fused):
        torch.manual_seed(1)  # the same per-sample drop mask
        y = module(x)
        y.sum().backward()
        outputs.append(y)
    torch.testing.assert_close(outputs[1], outputs[0])
    assert_same_grads_and_buffers(original, fused)


def test_frozen_batchnorm_with_active_drop_runs_the_original():
    original = _timm_block().to(DEVICE)
    original.drop = 0.5
    randomize_bn(original)
    original.train()
    for bn in original.modules():  # frozen BatchNorms (fine-tuning): foldable, but the drop still applies
        if isinstance(bn, nn.BatchNorm2d):
            bn.eval()
    fused = FusedResidualFFN(copy.deepcopy(original), backend="triton")
    x = torch.randn(8, 16, 2, 3, device=DEVICE)
    torch.manual_seed(2)
    expected = original(x)
    torch.manual_seed(2)
    torch.testing.assert_close(fused(x), expected)


@pytest.mark.parametrize("build, reason", [
    (lambda: ResidualDrop(ConvNorm(16, 16, 3, 1, 1, groups=16)), "not a feed-forward block"),
    (lambda: ResidualDrop(nn.Sequential(ConvMlp(16, 32))), "not a feed-forward block"),
    (lambda: with_child(_timm_block(), "m.act", nn.Hardswish()), "not nn.ReLU"),
    (lambda: with_child(_timm_block(), "m.pw1.conv", nn.Conv2d(16, 32, 3, padding=1, bias=False)), "1×1"),
    (lambda: with_child(_cream_block(), "m.pw2.bn", nn.GroupNorm(1, 16)), "BatchNorm2d"),
    (lambda: with_child(_cream_block(), "m.pw2", _cream_block(32).m.pw1), "do not form"),
], ids=["depthwise", "sequential", "hardswish", "conv3x3", "groupnorm", "widths"])
def test_refuses_what_it_cannot_compute(build, reason):
    with pytest.raises(Unsupported, match=reason):
        FusedResidualFFN(build())


def test_patched_efficientvit_m0_matches_unpatched(op_runs):
    model = timm.create_model("efficientvit_m0", num_classes=10).to(DEVICE)
    randomize_bn(model)
    model.eval()
    patched = copy.deepcopy(model)
    report = evit_kernels.patch(patched)
    ffns = [m for m in patched.modules() if isinstance(m, FusedResidualFFN)]
    assert len(ffns) == report.counts()["timm.models.efficientvit_msra.ResidualDrop -> FusedResidualFFN"] == 16
    assert not report.skipped, "residual wrappers around other blocks are not FFN-rule material: no noise"
    # The kernel (through the interpreter: slow) on the first FFN of each width, the reference on the others: an
    # FFN's width fixes its input's shape too (each stage's blocks, and the downsample's FFNs on either side of it,
    # run at the resolution of the stage whose width they have).
    widths = {m.m.pw1.conv.weight.shape: m for m in reversed(ffns)}
    assert len(widths) == 3
    for m in widths.values():
        m.backend = "triton"
    x = torch.randn(1, 3, 64, 64, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(patched(x), model(x), rtol=1e-4, atol=1e-4)
    assert op_runs.count(("ffn", "triton")) == 3 and op_runs.count(("ffn", "torch")) == 13
    assert patched.state_dict().keys() == model.state_dict().keys()
    evit_kernels.unpatch(patched)
    assert not any(isinstance(m, FusedResidualFFN) for m in patched.modules())
