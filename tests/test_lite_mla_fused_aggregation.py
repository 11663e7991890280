"""evit::relu_linear_attention_aggregated (LiteMLA's multi-scale aggregation folded into the attention) against
the float64 composition of the two ops it replaces, and FusedLiteMLA taking it for inference (on CPU through the
Triton interpreter on tiny grids)."""

from __future__ import annotations

import copy

import pytest
import torch

from evit_kernels import dispatch
from evit_kernels.nn.lite_mla import FusedLiteMLA
from evit_kernels.ops.relu_linear_attention import (
    AggregatedArgs,
    choose_aggregated,
    relu_linear_attention_aggregated,
    relu_linear_attention_aggregated_reference,
)
from evit_kernels.triton import relu_linear_attention as kernels
from tests.numerics import assert_within_twice_eager
from tests.test_lite_mla import CHANNELS, build

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REQUEST = "relu_linear_attention_aggregated=triton"


def _inputs(batch, heads, dim, height, width, kernel_sizes, biases, dtype, channels_last=False):
    """qkv and the per-scale (dw_weights, dw_biases, pw_weights, pw_biases) lists; ``biases`` says which of the
    depthwise and pointwise convs have one ("both", "dw", "none")."""
    channels = 3 * heads * dim
    qkv = torch.randn(batch, channels, height, width, device=DEVICE).to(dtype)
    if channels_last:
        qkv = qkv.contiguous(memory_format=torch.channels_last)

    def param(*shape, scale):
        return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)

    dw_weights = [param(channels, 1, k, k, scale=1 / k) for k in kernel_sizes]
    pw_weights = [param(channels, dim, 1, 1, scale=dim ** -0.5) for _ in kernel_sizes]
    dw_biases = [param(channels, scale=0.5) if biases in ("both", "dw") else None for _ in kernel_sizes]
    pw_biases = [param(channels, scale=0.5) if biases == "both" else None for _ in kernel_sizes]
    return qkv, dw_weights, dw_biases, pw_weights, pw_biases


def _double(values):
    return [None if v is None else v.double() for v in values]


# (batch, heads, dim, H, W, depthwise kernel sizes (one per scale), biases, channels_last): k 3 and 5, S 0 to 2,
# every supported d, 1×1 / 2×3 / 5×7 maps, 99 tokens (two chunks), fp32 d = 32 (16-token tiles, so the
# depthwise taps cross tiles), batch 2; NCHW maps whose tokens come in runs of 4 (12 tokens; 100, two chunks); taps
# staged whole by the aggregated one-pass kernel in fp16/bf16 (``Heads.whole_rows``: 2×6, 2×3, 7×7 with two scales,
# 8×8 with 8 channels padded to 16; checked by ``test_the_cases_said_to_take_heads_whole_do``).
CASES = [
    (1, 1, 8, 5, 7, (3,), "both", False),
    (1, 1, 16, 2, 6, (5,), "both", False),
    (1, 1, 8, 10, 10, (3,), "none", False),
    (1, 1, 16, 2, 3, (5,), "none", False),
    (1, 1, 32, 1, 1, (3, 5), "both", False),
    (2, 1, 8, 2, 3, (5, 3), "dw", True),
    (1, 2, 8, 5, 7, (), "none", False),
    (1, 1, 32, 5, 7, (5,), "both", False),
    (1, 1, 8, 9, 11, (5,), "none", True),
    (2, 2, 16, 7, 7, (5, 3), "both", False),
    (1, 1, 8, 8, 8, (5,), "none", False),
]


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch, heads, dim, height, width, kernel_sizes, biases, channels_last", CASES)
def test_matches_float64_composition_within_twice_eager_error(poisoned_empty, batch, heads, dim, height, width,
                                                              kernel_sizes, biases, channels_last, dtype):
    eps = 1e-5
    qkv, *scales = _inputs(batch, heads, dim, height, width, kernel_sizes, biases, dtype, channels_last)
    expected = relu_linear_attention_aggregated_reference(AggregatedArgs(qkv.double(), *map(_double, scales), dim, eps))
    out = relu_linear_attention_aggregated(qkv, *scales, dim, eps, backend="triton")
    eager = relu_linear_attention_aggregated(qkv, *scales, dim, eps, backend="torch")
    assert out.dtype == dtype and out.shape == expected.shape and torch.isfinite(out).all()
    terms = max(kernel_sizes, default=0) ** 2 + dim + height * width + dim  # aggregation, then attention
    assert_within_twice_eager(out, eager, expected, dtype, terms)



def test_the_cases_said_to_take_heads_whole_do():
    """The cases above that stand for the aggregated one-pass kernel's staged taps (the comment over ``CASES``) take
    them in fp16 and bf16, the others not: else those cases would test the token tiles only."""
    from evit_kernels import predict

    def whole(case, dtype):
        batch, heads, dim, height, width, kernel_sizes, biases, channels_last = case
        qkv, *scales = _inputs(batch, heads, dim, height, width, kernel_sizes, biases, dtype, channels_last)
        meta = [[None if t is None else t.to("meta") for t in group] for group in scales]
        with predict.recorded_launches() as launches:
            kernels.forward_aggregated(qkv.to("meta"), list(zip(*meta)), dim, 1e-5)
        return {launch.constexprs["WHOLE_ROWS"] for launch in launches
                if launch.kernel == "_rla_agg_fwd_one_pass_kernel"}

    staged = {(1, 1, 16, 2, 6), (1, 1, 16, 2, 3), (2, 2, 16, 7, 7), (1, 1, 8, 8, 8)}
    for case in CASES:
        for dtype in (torch.float16, torch.bfloat16):
            if case[:5] in staged:
                assert whole(case, dtype) == {case[2]}, (case, dtype)
            else:  # the token tiles, or the two passes (no one-pass launch)
                assert whole(case, dtype) <= {0}, (case, dtype)


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_heads_of_16_channels_taken_whole_in_the_128_token_tile(poisoned_empty, monkeypatch, dtype):
    """A 9×9 map (81 tokens) makes one chunk where the programs are many (B1 at 288 px, batch 64: 1024 of them); here
    two programs are made to take it in one chunk too, so that the one-pass kernels run in their 128-token whole
    tile, the plain attention's and the aggregated scale's, against the float64 composition."""
    from evit_kernels import predict

    monkeypatch.setattr(kernels, "_TARGET_PROGRAMS", 1)
    qkv, *scales = _inputs(1, 2, 16, 9, 9, (5,), "both", dtype)
    meta = [[None if t is None else t.to("meta") for t in group] for group in scales]
    with predict.recorded_launches() as launches:
        kernels.forward_aggregated(qkv.to("meta"), list(zip(*meta)), 16, 1e-5)
    assert {(launch.kernel, launch.constexprs["WHOLE_ROWS"], launch.constexprs["BLOCK_N"]) for launch in launches} \
        == {("_rla_fwd_one_pass_kernel", 16, 128), ("_rla_agg_fwd_one_pass_kernel", 16, 128)}
    expected = relu_linear_attention_aggregated_reference(AggregatedArgs(qkv.double(), *map(_double, scales), 16, 1e-5))
    out = relu_linear_attention_aggregated(qkv, *scales, 16, 1e-5, backend="triton")
    eager = relu_linear_attention_aggregated(qkv, *scales, 16, 1e-5, backend="torch")
    assert_within_twice_eager(out, eager, expected, dtype, 5 ** 2 + 16 + 81 + 16)


@pytest.mark.numerics
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch, heads, dim, height, width", [
    (256, 8, 16, 7, 7),     # B1 stage 4 at 224 px: one chunk, one pass (fp16/bf16)
    (256, 8, 16, 14, 14),   # B1 stage 3 at 224 px: 2048 programs, one chunk of 196 tokens
    (1, 16, 32, 7, 7),      # L2 stage 4 at batch 1: 16-token tiles in one pass (fp16/bf16)
    (1, 8, 16, 28, 28),     # split over the tokens: the reduction and apply passes
])
def test_realistic_shapes_on_gpu(batch, heads, dim, height, width, dtype):
    qkv, *scales = _inputs(batch, heads, dim, height, width, (5,), "none", dtype)
    expected = relu_linear_attention_aggregated_reference(AggregatedArgs(qkv.double(), *map(_double, scales), dim,
                                                                         1e-5))
    out = relu_linear_attention_aggregated(qkv, *scales, dim, 1e-5, backend="triton")
    eager = relu_linear_attention_aggregated(qkv, *scales, dim, 1e-5, backend="torch")
    assert_within_twice_eager(out, eager, expected, dtype, 5 ** 2 + dim + height * width + dim)

def test_fp16_large_activations_with_mit_han_lab_eps():
    # eps 1e-15 is 0 in fp16 and the kv sums overflow 65504: the kernels accumulate and divide in fp32.
    qkv, *scales = _inputs(1, 2, 16, 5, 5, (5,), "none", torch.float16)
    qkv = qkv * 300
    expected = relu_linear_attention_aggregated_reference(
        AggregatedArgs(qkv.double(), *map(_double, scales), 16, 1e-15))
    out = relu_linear_attention_aggregated(qkv, *scales, 16, 1e-15, backend="triton")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, rtol=2e-3, atol=2e-3 * expected.abs().max().item())


def test_gradients_are_the_reference_vjp():
    qkv, *scales = _inputs(1, 1, 8, 2, 3, (3,), "both", torch.float64)
    leaves = [qkv, *[t for group in scales for t in group]]
    for t in leaves:
        t.requires_grad_()
    # Through the library op, so that its registered backward (not PyTorch's own autograd) is what is checked.
    assert torch.autograd.gradcheck(lambda q, *rest: torch.ops.evit.relu_linear_attention_aggregated(
        q, [rest[0]], [rest[1]], [rest[2]], [rest[3]], 8, 1e-5, "torch"), leaves)

    qkv, *scales = _inputs(1, 1, 8, 3, 4, (5,), "dw", torch.float32)
    inputs = [qkv.requires_grad_(), scales[0][0].requires_grad_(), scales[2][0].requires_grad_()]
    triton_grads = torch.autograd.grad(relu_linear_attention_aggregated(qkv, *scales, 8, 1e-5, backend="triton")
                                       .sum(), inputs)
    torch_grads = torch.autograd.grad(relu_linear_attention_aggregated(qkv, *scales, 8, 1e-5, backend="torch")
                                      .sum(), inputs)
    for got, expected in zip(triton_grads, torch_grads):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend):
    qkv, *scales = _inputs(1, 1, 8, 2, 3, (3, 5), "dw", torch.float32)
    for group in scales:
        for t in group:
            if t is not None:
                t.requires_grad_()
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if backend == "triton" and DEVICE == "cpu":  # the interpreter cannot read AOT tracing's tensors' storage
        tests = tests[:-1]
    torch.library.opcheck(torch.ops.evit.relu_linear_attention_aggregated,
                          (qkv.requires_grad_(), *scales, 8, 1e-5, backend), test_utils=tests)


@pytest.mark.parametrize("change, reason", [
    (lambda a: {**a, "dw_weights": [torch.randn(24, 1, 7, 7, device=DEVICE)]}, "kernel size"),
    (lambda a: {k: _double(v) if isinstance(v, list) else v.double() for k, v in a.items()}, "float64"),
    (lambda a: {**a, "qkv": a["qkv"].transpose(2, 3)}, "stride"),
])
def test_unsupported_inputs_raise_on_request_and_fall_back_under_auto(change, reason, pretend_measured):
    qkv, dw, dw_b, pw, pw_b = _inputs(1, 1, 8, 4, 6, (3,), "none", torch.float32)
    args = change(dict(qkv=qkv, dw_weights=dw, dw_biases=dw_b, pw_weights=pw, pw_biases=pw_b))
    with pytest.raises(dispatch.BackendUnavailable, match=reason):
        relu_linear_attention_aggregated(**args, dim=8, eps=1e-5, backend="triton")
    pretend_measured("relu_linear_attention_aggregated", "triton")  # "auto" considers it, must pass these over
    assert choose_aggregated(**args, dim=8, eps=1e-5)[0].name == "torch"
    assert torch.isfinite(relu_linear_attention_aggregated(**args, dim=8, eps=1e-5)).all()


def test_head_dim_above_32_raises_on_request():
    qkv, *scales = _inputs(1, 1, 64, 1, 2, (3,), "none", torch.float32)
    with pytest.raises(dispatch.BackendUnavailable, match="head dim 64"):
        relu_linear_attention_aggregated(qkv, *scales, 64, 1e-5, backend="triton")


def test_mismatched_scale_lists_raise():
    qkv, dw, dw_b, pw, pw_b = _inputs(1, 1, 8, 2, 2, (3,), "none", torch.float32)
    with pytest.raises(ValueError, match="one entry per scale"):
        relu_linear_attention_aggregated(qkv, dw, dw_b, pw, [], 8, 1e-5)


@pytest.fixture
def kernel_calls(monkeypatch):
    """How many times the aggregated-source Triton launcher ran."""
    calls = []
    launcher = kernels.forward_aggregated
    monkeypatch.setattr(kernels, "forward_aggregated", lambda *args: calls.append(1) or launcher(*args))
    return calls


@pytest.mark.parametrize("scales, use_bias, shape", [((5,), False, (5, 7)), ((3, 5), True, (2, 3)),
                                                     ((), False, (1, 1))])
@pytest.mark.parametrize("kind", ["timm", "mit"])
def test_fused_lite_mla_inference_matches_original(kernel_calls, kind, scales, use_bias, shape):
    """timm (eps 1e-5) and efficientsam (eps 1e-15) LiteMLAs in eval under no_grad take the fused op."""
    original = build(kind, 8, scales, use_bias=use_bias).to(DEVICE).eval()
    fused = FusedLiteMLA(copy.deepcopy(original), backend=REQUEST).eval()
    x = torch.randn(1, CHANNELS, *shape, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), original(x), rtol=1e-5, atol=1e-5)
    assert len(kernel_calls) == 1


def test_fused_lite_mla_takes_the_op_only_without_gradients(kernel_calls):
    original = build("timm", 8, (5,)).to(DEVICE).eval()
    x = torch.randn(1, CHANNELS, 3, 4, device=DEVICE)
    fused = FusedLiteMLA(copy.deepcopy(original), backend=REQUEST).eval()
    expected = original(x)
    torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)  # parameters need gradients
    assert not kernel_calls
    fused.requires_grad_(False)
    torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)  # nothing needs a gradient
    assert len(kernel_calls) == 1
    torch.testing.assert_close(fused(x.requires_grad_()), expected, rtol=1e-5, atol=1e-5)  # the input does
    assert len(kernel_calls) == 1
    with torch.no_grad():  # the default (auto) keeps the reference path until a GPU validates the kernels
        torch.testing.assert_close(FusedLiteMLA(copy.deepcopy(original)).eval()(x), expected, rtol=1e-5, atol=1e-5)
    assert len(kernel_calls) == 1


def test_fused_lite_mla_explicit_request_for_an_unsupported_kernel_size_raises():
    fused = FusedLiteMLA(build("mit", 8, (7,)).to(DEVICE), backend=REQUEST).eval()
    with torch.no_grad(), pytest.raises(dispatch.BackendUnavailable, match="kernel size"):
        fused(torch.randn(1, CHANNELS, 3, 3, device=DEVICE))
