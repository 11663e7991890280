"""The Triton backend of evit::window_attention (the cascaded-group-attention core) and of the whole-map
evit::cascaded_group_attention, against float64 references (on CPU through the Triton interpreter on tiny
grids; on a GPU with the same shapes)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import timm
import torch
from torch import nn
from torch.utils._pytree import tree_map_only

from evit_kernels import dispatch, predict
from evit_kernels.nn.cascaded_group_attention import FusedCascadedGroupAttention, FusedLocalWindowAttention
from evit_kernels.ops.cascaded_group_attention import (
    CascadedGroupAttentionArgs,
    WindowAttentionArgs,
    cascaded_group_attention,
    cascaded_group_attention_reference,
    whole_map_kernel_reasons,
    window_attention,
    window_attention_reference,
)
from evit_kernels.triton import cascaded_group_attention as triton_cga
from tests.cga_configs import CONFIGS, cast, folded_inputs, whole_map_terms
from tests.models import randomize_bn
from tests.numerics import assert_within_twice_eager, in_layout, max_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _window_inputs(windows, key_dim, val_dim, resolution, dtype, bias_dtype=None, strided=False):
    """q, k, v (B', kd, N) / (B', vd, N) and a bias row. ``strided``: k and v are views into one qkv tensor and
    q is token-strided, as the module's convs hand them over (channels_last maps)."""
    n = resolution * resolution
    if strided:
        qkv = torch.randn(windows, n, 2 * key_dim + val_dim, device=DEVICE).to(dtype).transpose(1, 2)
        q, k, v = qkv.split([key_dim, key_dim, val_dim], dim=1)
    else:
        q, k, v = (torch.randn(windows, c, n, device=DEVICE).to(dtype) for c in (key_dim, key_dim, val_dim))
    bias_row = torch.randn(n, device=DEVICE).to(bias_dtype or dtype)
    return q, k, v, bias_row


def _run(inputs, resolution, scale, grad_out, backend):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = window_attention(*leaves, resolution, scale, backend=backend)
    return out, torch.autograd.grad(out, leaves, grad_out.to(out.dtype))


# (windows, key_dim, val_dim, resolution, strided, fp32 bias row): the released windows (7: 49 tokens, 4: 16),
# value dims 16/64/80, 1-3 windows, plus padding-heavy odd sizes (R = 3, 5; kd and vd not multiples of 16).
SHAPES = [
    (2, 16, 80, 7, True, False),
    (1, 16, 16, 4, False, True),
    (3, 16, 64, 4, True, False),
    (2, 5, 24, 3, False, False),
    (1, 16, 16, 5, False, True),
]


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("windows, key_dim, val_dim, resolution, strided, fp32_bias", SHAPES)
def test_core_and_gradients_within_twice_eager_error(poisoned_empty, windows, key_dim, val_dim, resolution, strided,
                                                     fp32_bias, dtype):
    scale = key_dim ** -0.5
    inputs = _window_inputs(windows, key_dim, val_dim, resolution, dtype, torch.float32 if fp32_bias else None,
                            strided)
    exact_inputs = [t.detach().double().requires_grad_() for t in inputs]
    expected = window_attention_reference(WindowAttentionArgs(*exact_inputs, resolution, scale))
    grad_out = torch.randn_like(expected)
    exact_grads = torch.autograd.grad(expected, exact_inputs, grad_out)

    out, grads = _run(inputs, resolution, scale, grad_out, "triton")
    eager_out, eager_grads = _run(inputs, resolution, scale, grad_out, "torch")
    assert out.dtype == dtype and out.shape == expected.shape and torch.isfinite(out).all()
    terms = 2 * resolution**2 + key_dim + val_dim  # scores over kd, softmax and output sums over the tokens
    assert_within_twice_eager(out, eager_out, expected, dtype, terms)
    for got, eager, exact, leaf in zip(grads, eager_grads, exact_grads, inputs, strict=True):
        assert got.dtype == leaf.dtype and got.shape == leaf.shape and torch.isfinite(got).all()
        assert_within_twice_eager(got, eager, exact, leaf.dtype, terms, "gradient")


def test_stride_zero_gradient_and_deterministic_bias_gradient():
    inputs = [t.requires_grad_() for t in _window_inputs(3, 16, 32, 7, torch.float32)]
    window_attention(*inputs, 7, 0.25, backend="triton").sum().backward()
    first_bias_grad = inputs[3].grad.clone()
    exact = [t.detach().double().requires_grad_() for t in inputs]
    window_attention_reference(WindowAttentionArgs(*exact, 7, 0.25)).sum().backward()
    for got, ref in zip(inputs, exact):
        torch.testing.assert_close(got.grad.double(), ref.grad, rtol=1e-4, atol=1e-5)
    inputs[3].grad = None
    window_attention(*inputs, 7, 0.25, backend="triton").sum().backward()
    assert torch.equal(inputs[3].grad, first_bias_grad)  # bit-identical on every run
    # The interpreter runs programs one after another, so the repeat above would pass with atomics too: on CPU
    # the kernels' source is what shows that no atomic reduction is there.
    assert "tl.atomic" not in Path(triton_cga.__file__).read_text()


def test_bias_row_keeps_fp32_under_autocast():
    q, k, v, bias_row = _window_inputs(2, 16, 16, 4, torch.float32)
    bias_row.requires_grad_()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = window_attention(q, k, v, bias_row, 4, 0.25, backend="triton")
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert bias_row.grad.dtype == torch.float32 and torch.isfinite(bias_row.grad).all()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_opcheck(backend):
    q, k, v, bias_row = (t.requires_grad_() for t in _window_inputs(2, 16, 16, 4, torch.float32, strided=True))
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if DEVICE == "cpu" and backend == "triton":  # the interpreter cannot read the storage AOT tracing hands it
        tests = tests[:-1]
    torch.library.opcheck(torch.ops.evit.window_attention, (q, k, v, bias_row, 4, 0.25, backend), test_utils=tests)


def test_unsupported_inputs_raise_on_request_and_fall_back_under_auto(pretend_measured):
    q, k, v, bias_row = (t.double() for t in _window_inputs(1, 16, 16, 4, torch.float32))
    with pytest.raises(dispatch.BackendUnavailable, match="float64"):
        window_attention(q, k, v, bias_row, 4, 0.25, backend="triton")
    pretend_measured("window_attention", "triton")  # so that "auto" considers it: it must pass these over
    assert dispatch.choose(WindowAttentionArgs(q, k, v, bias_row, 4, 0.25)).name == "torch"
    torch.testing.assert_close(window_attention(q, k, v, bias_row, 4, 0.25),
                               window_attention_reference(WindowAttentionArgs(q, k, v, bias_row, 4, 0.25)))
    big = _window_inputs(1, 16, 16, 9, torch.float32)
    with pytest.raises(dispatch.BackendUnavailable, match="window 9×9"):
        window_attention(*big, 9, 0.25, backend="triton")
    assert torch.isfinite(window_attention(*big, 9, 0.25)).all()
    with pytest.raises(ValueError, match="bias_row"):
        window_attention(q, k, v, bias_row[:-1], 4, 0.25)
    with pytest.raises(ValueError, match="3×3 window"):
        window_attention(q, k, v, bias_row, 3, 0.25)


# --- the whole-map op and the modules ---------------------------------------------------------------------------

def _map_op_inputs(dtype, map_hw, window, heads=2, key_dim=16, kernels=(5, 3)):
    """An M-style configuration: kd 16, value dim = C/heads = 16, one depthwise kernel per head."""
    def t(*shape, std=0.3):
        return (torch.randn(*shape, device=DEVICE) * std).to(dtype).requires_grad_()

    val_dim = 16
    qkv_out = 2 * key_dim + val_dim
    return (t(2, heads * val_dim, *map_hw, std=1.0), [t(qkv_out, val_dim, 1, 1) for _ in range(heads)],
            [t(qkv_out) for _ in range(heads)], [t(key_dim, 1, ks, ks) for ks in kernels],
            [t(key_dim) for _ in kernels], t(heads, window * window, std=1.0), t(24, heads * val_dim, 1, 1), t(24),
            key_dim, window)


@pytest.mark.parametrize("map_hw, window", [((9, 11), 7), ((2, 3), 4)])
def test_whole_map_op_triton_backend_matches_reference(map_hw, window):
    args = _map_op_inputs(torch.float32, map_hw, window)
    tensors, spec = torch.utils._pytree.tree_flatten(list(args[:8]))
    exact_tensors = [t.detach().double().requires_grad_() for t in tensors]

    def run(flat, backend):
        out = cascaded_group_attention(*torch.utils._pytree.tree_unflatten(list(flat), spec), *args[8:],
                                       backend=backend)
        return out, torch.autograd.grad(out, flat, weight.to(out.dtype))

    weight = torch.randn(2, 24, *map_hw, device=DEVICE, dtype=torch.float64)
    expected, exact_grads = run(exact_tensors, "torch")
    out, grads = run(tensors, "triton")
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    for got, want in zip(grads, exact_grads, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_whole_map_op_triton_backend_raises_or_falls_back(pretend_measured):
    args = [torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.detach().double(), a)
            for a in _map_op_inputs(torch.float32, (4, 5), 4)]
    with pytest.raises(dispatch.BackendUnavailable, match="float64"):
        cascaded_group_attention(*args, backend="triton")
    pretend_measured("cascaded_group_attention", "triton")
    assert dispatch.choose(CascadedGroupAttentionArgs(*args)).name == "torch"
    assert torch.isfinite(cascaded_group_attention(*args)).all()


def _randomised_m0_mixer() -> nn.Module:
    """timm efficientvit_m0's first LocalWindowAttention (4 heads, kd 16, vd 16, window 7), with non-trivial
    BatchNorm statistics and position biases."""
    lwa = randomize_bn(timm.create_model("efficientvit_m0", pretrained=False).stages[0].blocks[0].mixer.m)
    with torch.no_grad():
        lwa.attn.attention_biases.normal_()
    return lwa.to(DEVICE)


def test_patched_timm_m0_attention_trains_through_triton_core():
    original = _randomised_m0_mixer().train()
    exact = copy.deepcopy(original).double()
    patched = FusedLocalWindowAttention(copy.deepcopy(original))
    patched.attn = FusedCascadedGroupAttention(patched.attn, backend="triton")
    x = torch.randn(1, original.dim, 9, 11, device=DEVICE, dtype=torch.float64)  # padded to 14×14: 4 windows
    weight = torch.randn_like(x)
    results = []
    for module in (exact, original, patched):  # train mode: BatchNorm uses batch statistics
        dtype = next(module.parameters()).dtype
        xi = x.to(dtype, copy=True).requires_grad_()
        out = module(xi)
        (out * weight.to(dtype)).sum().backward()
        results.append([out, xi.grad] + [p.grad for p in module.parameters()])
    # Output, input gradient and every parameter's gradient. Batch-statistics BatchNorm amplifies rounding
    # differently per path, so the bound is eager's error or 1e-5 of the largest magnitude, whichever is larger
    # (the kernel itself is held to 2x eager's error above).
    for want, eager, got in zip(*results, strict=True):
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        assert max_err(got, want) <= max(2 * max_err(eager, want), 1e-5 * want.abs().max().item())


def test_patched_module_requesting_triton_raises_for_unsupported_dtype():
    original = _randomised_m0_mixer().double().train()
    patched = FusedLocalWindowAttention(copy.deepcopy(original))
    patched.attn = FusedCascadedGroupAttention(patched.attn, backend="triton")
    with pytest.raises(dispatch.BackendUnavailable, match="float64"):
        patched(torch.randn(1, original.dim, 7, 7, dtype=torch.float64, device=DEVICE))


def test_per_head_scratch_beyond_32_bit_offsets_is_refused():
    # One 40-channel head (one launch per head in bf16): 2^19 windows of 7×7 keep the map and the heads' output
    # within 32-bit offsets, but not the per-window tiles passing each head's output on (64 × 64 each).
    def reasons(batch):
        args = folded_inputs((40, 1, (5,)), 7, 7, 7, torch.bfloat16, "meta", batch=batch)
        return whole_map_kernel_reasons(CascadedGroupAttentionArgs(*args))

    assert reasons(2**19) == ["a scratch tile per window of 2^31 elements or more (the kernel indexes with 32 bits)"]
    assert reasons(2**18) == []


def _check_whole_map(config, H, W, window, dtype, layout="contiguous"):
    args = folded_inputs(config, H, W, window, dtype, DEVICE, batch=1)
    args = (in_layout(args[0], layout), *args[1:])
    expected = cascaded_group_attention_reference(CascadedGroupAttentionArgs(*cast(args, torch.float64)))
    out = cascaded_group_attention(*args, backend="triton")
    eager = cascaded_group_attention(*args, backend="torch")
    assert out.dtype == dtype and out.is_contiguous()
    assert_within_twice_eager(out, eager, expected, dtype, whole_map_terms(config, window), f"{H}x{W} {layout}")
    # One whole-window kernel for every head, or for heads too wide for it one launch per head; where both would
    # spill, the Triton backend runs the composition around the Triton core.
    val_dim, heads = config[0] // config[1], config[1]
    whole_window = triton_cga.map_warps(dtype, window, val_dim) is not None
    per_head = not whole_window and triton_cga.head_warps(dtype, window, val_dim) is not None
    assert bool(whole_map_kernel_reasons(CascadedGroupAttentionArgs(*args))) != (whole_window or per_head)
    with predict.recorded_launches() as launches:
        cascaded_group_attention(*tree_map_only(torch.Tensor, lambda t: t.to("meta"), args), backend="triton")
    kernels = [launch.kernel for launch in launches]
    if whole_window:
        assert kernels == ["_cga_map_fwd_kernel", "_conv_dense_kernel"]
    elif per_head:
        assert kernels == ["_cga_head_fwd_kernel"] * heads + ["_conv_dense_kernel"]
        assert [launch.constexprs["FIRST"] for launch in launches[:heads]] == [True] + [False] * (heads - 1)


@pytest.mark.numerics
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_whole_map_triton_on_every_released_configuration(config, dtype):
    """The whole-map kernel for every released M0-M5 attention (heads, kernels, value dims), at a stage map with
    4 windows (14x14), a map needing padding (9x11, in fp32: bf16's padded maps are the next test's, for both
    kernels) and the 4x4 stage (or its refusal where it would spill)."""
    torch.manual_seed(0)
    padded = [(9, 11, 7)] if dtype == torch.float32 else []
    for H, W, window in [(14, 14, 7), *padded, (4, 4, 4)]:
        _check_whole_map(config, H, W, window, dtype)


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("channels", [96, 144])  # 32-channel heads: the whole-window kernel; 48: one per head
def test_whole_map_triton_low_precision_and_any_layout(dtype, layout, channels):
    """Reduced precision on the tensor cores, and the map read in place whatever its strides: m1's mixed depthwise
    kernels (7, 5, 3) on a padded map."""
    torch.manual_seed(0)
    _check_whole_map((channels, 3, (7, 5, 3)), 9, 11, 7, dtype, layout)
