"""Property-based fuzzing of the Triton kernels against the float64 reference: random sizes, layouts (contiguous,
channels_last, every other column of a wider tensor) and dtypes. Inside what a kernel takes, its result (and its
gradients, where it has a backward) must be within twice eager's error of float64; outside, an explicit request
must be refused with the reason. hypothesis runs a fixed, derandomized sequence of cases, the same on every
machine; on CPU through the Triton interpreter, so the shapes stay small."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from evit_kernels import dispatch
from evit_kernels.ops.cascaded_group_attention import (
    CascadedGroupAttentionArgs,
    WindowAttentionArgs,
    cascaded_group_attention,
    cascaded_group_attention_reference,
    window_attention,
    window_attention_reference,
)
from evit_kernels.ops.conv_block import conv_block
from evit_kernels.ops.conv_bn_act import ACTIVATIONS, ConvBnActArgs, conv_bn_act, conv_bn_act_reference
from evit_kernels.ops.ffn import FfnArgs, ffn, ffn_reference
from evit_kernels.ops.relu_linear_attention import (
    AggregatedArgs,
    ReluLinearAttentionArgs,
    TokenMajorArgs,
    relu_linear_attention,
    relu_linear_attention_aggregated,
    relu_linear_attention_aggregated_reference,
    relu_linear_attention_reference,
    relu_linear_attention_tokens,
    relu_linear_attention_tokens_reference,
)
from evit_kernels.triton import _common as triton_common
from evit_kernels.triton.cascaded_group_attention import MAX_RESOLUTION
from evit_kernels.triton.relu_linear_attention import AGGREGATION_KERNEL_SIZES, HEAD_DIMS, WHOLE_HEAD_DIMS
from tests.cga_configs import cast, folded_inputs, whole_map_terms
from tests.numerics import assert_within_twice_eager, in_layout
from tests.test_conv_block import Case
from tests.test_conv_block import _double as _double_block
from tests.test_conv_block import _inputs as _block_inputs
from tests.test_conv_block import _terms as _block_terms
from tests.test_lite_mla_fused_aggregation import _inputs as _aggregation_inputs
from tests.test_relu_linear_attention_tokens import with_rotated

pytestmark = pytest.mark.numerics

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FUZZ = settings(max_examples=15, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
ACTIVATION_TRIPLES = st.tuples(*[st.sampled_from(ACTIVATIONS)] * 3)
LAYOUTS = st.sampled_from(["contiguous", "channels_last", "strided"])


def _randn(*shape, scale=1.0):
    return torch.randn(*shape, device=DEVICE) * scale


def _refused(call) -> None:
    event("refused")
    with pytest.raises(dispatch.BackendUnavailable, match="backend 'triton' was requested but cannot run: .+"):
        call()


def _check_forward_and_gradients(run, reference, inputs, dtype, terms) -> None:
    """``run(backend, leaves)`` on Triton, its output and the gradients of every input, within twice eager's error
    of ``reference`` in float64."""
    exact = [t.detach().double().requires_grad_() for t in inputs]
    expected = reference(exact)
    grad_out = torch.randn_like(expected)
    exact_grads = torch.autograd.grad(expected, exact, grad_out)
    results = {}
    for backend in ("triton", "torch"):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = run(backend, leaves)
        results[backend] = (out, torch.autograd.grad(out, leaves, grad_out.to(dtype)))
    (out, grads), (eager, eager_grads) = results["triton"], results["torch"]
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert_within_twice_eager(out, eager, expected, dtype, terms)
    for got, eager_grad, exact_grad in zip(grads, eager_grads, exact_grads, strict=True):
        assert_within_twice_eager(got, eager_grad, exact_grad, dtype, terms, "gradient")


@FUZZ
@given(dtype=DTYPES, layout=LAYOUTS, batch=st.integers(1, 2), channels=st.integers(1, 20),
       out_channels=st.integers(1, 20), height=st.integers(1, 9), width=st.integers(1, 9),
       kind=st.sampled_from(["depthwise", "pointwise", "dense"]), k=st.sampled_from([1, 3, 5, 7, 9]),
       stride=st.integers(1, 2), bias=st.booleans(), residual=st.booleans(), activation=st.sampled_from(ACTIVATIONS))
def test_conv_bn_act(dtype, layout, batch, channels, out_channels, height, width, kind, k, stride, bias, residual,
                     activation):
    if kind == "pointwise":
        k, stride, groups = 1, 1, 1
    elif kind == "depthwise":
        out_channels, groups = channels, channels
    else:
        groups = 1
    depthwise = groups == channels == out_channels  # (a one-channel "dense" conv is depthwise too)
    supported = (depthwise and k in (3, 5, 7)) or (k == 1 and groups == 1 and stride == 1)
    x = in_layout(_randn(batch, channels, height, width), layout).to(dtype)
    weight = _randn(out_channels, channels // groups, k, k, scale=(channels // groups * k * k) ** -0.5).to(dtype)
    b = _randn(out_channels).to(dtype) if bias else None
    out_hw = [(n + 2 * (k // 2) - k) // stride + 1 for n in (height, width)]
    r = in_layout(_randn(batch, out_channels, *out_hw), layout).to(dtype) if residual else None
    conv = dict(stride=stride, padding=k // 2, groups=groups, activation=activation, residual=r)
    run = lambda backend: conv_bn_act(x, weight, b, **conv, backend=backend)  # noqa: E731
    if not supported:
        _refused(lambda: run("triton"))
        return
    f64 = [None if t is None else t.double() for t in (x, weight, b, r)]
    expected = conv_bn_act_reference(ConvBnActArgs(f64[0], f64[1], f64[2], [stride] * 2, [k // 2] * 2, [1, 1], groups,
                                                   activation, f64[3]))
    out = run("triton")
    assert out.dtype == dtype and out.shape == expected.shape and torch.isfinite(out).all()
    assert_within_twice_eager(out, run("torch"), expected, dtype, weight[0].numel())


@FUZZ
@given(dtype=DTYPES, layout=LAYOUTS, batch=st.integers(1, 2), channels=st.sampled_from([4, 8, 16, 24, 520]),
       height=st.integers(1, 6), width=st.integers(1, 6), biases=st.booleans(), residual=st.booleans())
def test_ffn(dtype, layout, batch, channels, height, width, biases, residual):
    hidden = 2 * channels
    if channels > 512:  # beyond what the kernel holds on chip: refused before any work (tiny map, no memory)
        height = width = 1
    x = in_layout(_randn(batch, channels, height, width), layout).to(dtype)
    w1 = _randn(hidden, channels, 1, 1, scale=channels ** -0.5).to(dtype)
    w2 = _randn(channels, hidden, 1, 1, scale=hidden ** -0.5).to(dtype)
    b1, b2 = ((_randn(n).to(dtype) if biases else None) for n in (hidden, channels))
    r = in_layout(_randn(batch, channels, height, width), layout).to(dtype) if residual else None
    args = (x, w1, b1, w2, b2, r)
    if channels > 512:
        _refused(lambda: ffn(*args, backend="triton"))
        return
    expected = ffn_reference(FfnArgs(*(None if t is None else t.double() for t in args)))
    out = ffn(*args, backend="triton")
    assert out.dtype == dtype and out.shape == expected.shape and torch.isfinite(out).all()
    assert_within_twice_eager(out, ffn_reference(FfnArgs(*args)), expected, dtype, channels + hidden)


@FUZZ
@given(dtype=DTYPES, channels_last=st.booleans(), batch=st.integers(1, 2), heads=st.integers(1, 2),
       dim=st.sampled_from([4, 8, 16, 32]), height=st.integers(1, 7), width=st.integers(1, 7),
       scales=st.integers(0, 2))
def test_relu_linear_attention_forward_and_gradients(dtype, channels_last, batch, heads, dim, height, width, scales):
    sources = [in_layout(_randn(batch, 3 * heads * dim, height, width), "channels_last" if channels_last
                         else "contiguous").to(dtype) for _ in range(1 + scales)]
    run = lambda backend, t: relu_linear_attention(t[0], t[1:], dim, 1e-5, backend=backend)  # noqa: E731
    if dim not in HEAD_DIMS:
        _refused(lambda: run("triton", sources))
        return
    _check_forward_and_gradients(run, lambda t: relu_linear_attention_reference(
        ReluLinearAttentionArgs(t[0], t[1:], dim, 1e-5)), sources, dtype, terms=height * width + dim)


@FUZZ
@given(dtype=DTYPES, rotated=st.booleans(), batch=st.integers(1, 2), heads=st.integers(1, 3),
       dim=st.sampled_from([4, 8, 16, 32, 64, 100, 112]), tokens=st.integers(2, 40))
def test_relu_linear_attention_tokens_forward_and_gradients(dtype, rotated, batch, heads, dim, tokens):
    """Sana's layout, (B, N, heads·d) projections, and the video form's rotated q and k (slices of one fused
    projection: tests/test_relu_linear_attention_tokens.py). One token is left out: the gradients of q and k are
    then 0 in exact arithmetic, and both sides return rounding noise."""
    tensors = [_randn(batch, tokens, heads * dim).to(dtype) for _ in range(3)]
    tensors = with_rotated(*tensors) if rotated else tensors

    def run(backend, t):
        return relu_linear_attention_tokens(*t[:3], heads, 1e-15, *t[3:], backend=backend)

    if dim not in HEAD_DIMS:
        _refused(lambda: run("triton", tensors))
        return
    _check_forward_and_gradients(run, lambda t: relu_linear_attention_tokens_reference(
        TokenMajorArgs(*t[:3], *(t[3:] or (None, None)), heads, 1e-15)), tensors, dtype, terms=tokens + dim)


@FUZZ
@given(dtype=DTYPES, windows=st.integers(1, 3), key_dim=st.integers(1, 20), val_dim=st.integers(1, 40),
       resolution=st.integers(1, MAX_RESOLUTION + 1), strided=st.booleans())
def test_window_attention_forward_and_gradients(dtype, windows, key_dim, val_dim, resolution, strided):
    n = resolution * resolution
    if strided:  # k and v views into one qkv tensor, q token-strided, as the module's convs hand them over
        qkv = _randn(windows, n, 2 * key_dim + val_dim).to(dtype).transpose(1, 2)
        q, k, v = qkv.split([key_dim, key_dim, val_dim], dim=1)
    else:
        q, k, v = (_randn(windows, c, n).to(dtype) for c in (key_dim, key_dim, val_dim))
    inputs = [q, k, v, _randn(n).to(dtype)]
    scale = key_dim ** -0.5
    if resolution > MAX_RESOLUTION:
        _refused(lambda: window_attention(*inputs, resolution, scale, backend="triton"))
        return
    _check_forward_and_gradients(lambda backend, t: window_attention(*t, resolution, scale, backend=backend),
                                 lambda t: window_attention_reference(WindowAttentionArgs(*t, resolution, scale)),
                                 inputs, dtype,
                                 terms=2 * n + key_dim + val_dim)


@FUZZ
@given(dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]), layout=LAYOUTS,
       kind=st.sampled_from(["mbconv", "dsconv", "fused"]), batch=st.integers(1, 2), channels=st.integers(1, 24),
       hidden=st.integers(1, 40), out_channels=st.integers(1, 16), height=st.integers(1, 9),
       width=st.integers(1, 9), ksize=st.sampled_from([3, 5, 7]), stride=st.integers(1, 2), biases=st.booleans(),
       residual=st.booleans(), activations=ACTIVATION_TRIPLES)
def test_conv_block(dtype, layout, kind, batch, channels, hidden, out_channels, height, width, ksize, stride, biases,
                    residual, activations):
    case = Case(kind, batch, channels, hidden, out_channels, height, width, ksize, stride, layout, biases, residual,
                activations)
    args, kwargs = _block_inputs(case, dtype)
    if dtype == torch.float64:  # the kernels take fp32, fp16 and bf16
        _refused(lambda: conv_block(*args, **kwargs, backend="triton"))
        return
    expected = conv_block(*_double_block(args, kwargs)[0], **_double_block(args, kwargs)[1], backend="torch")
    with mock.patch.object(triton_common, "SMS", 0):  # the small grids take the kernel wherever it applies
        out = conv_block(*args, **kwargs, backend="triton")
    assert out.dtype == dtype and out.shape == expected.shape and torch.isfinite(out).all()
    assert_within_twice_eager(out, conv_block(*args, **kwargs, backend="torch"), expected, dtype, _block_terms(args))


@FUZZ
@given(dtype=DTYPES, channels_last=st.booleans(), batch=st.integers(1, 2), heads=st.integers(1, 2),
       dim=st.sampled_from([4, 8, 16, 32]), height=st.integers(1, 7), width=st.integers(1, 7),
       kernel_sizes=st.lists(st.sampled_from([3, 5, 7]), max_size=2), biases=st.sampled_from(["both", "dw", "none"]))
def test_relu_linear_attention_aggregated(dtype, channels_last, batch, heads, dim, height, width, kernel_sizes,
                                          biases):
    qkv, *scales = _aggregation_inputs(batch, heads, dim, height, width, kernel_sizes, biases, dtype, channels_last)
    run = lambda backend: relu_linear_attention_aggregated(qkv, *scales, dim, 1e-5, backend=backend)  # noqa: E731
    if dim not in WHOLE_HEAD_DIMS or not set(kernel_sizes) <= set(AGGREGATION_KERNEL_SIZES):
        _refused(lambda: run("triton"))
        return
    doubled = [[None if t is None else t.double() for t in group] for group in scales]
    expected = relu_linear_attention_aggregated_reference(AggregatedArgs(qkv.double(), *doubled, dim, 1e-5))
    out = run("triton")
    assert out.dtype == dtype and out.shape == expected.shape and torch.isfinite(out).all()
    terms = max(kernel_sizes, default=0) ** 2 + dim + height * width + dim
    assert_within_twice_eager(out, run("torch"), expected, dtype, terms)


@FUZZ
@given(dtype=DTYPES, batch=st.integers(1, 2), heads=st.integers(1, 3), val_dim=st.integers(1, 12),
       kernels=st.lists(st.sampled_from([3, 5, 7]), min_size=3, max_size=3), height=st.integers(1, 10),
       width=st.integers(1, 10), window=st.integers(2, MAX_RESOLUTION + 1), channels_last=st.booleans())
def test_cascaded_group_attention(dtype, batch, heads, val_dim, kernels, height, width, window, channels_last):
    config = (heads * val_dim, heads, tuple(kernels[:heads]))
    args = list(folded_inputs(config, height, width, window, dtype, DEVICE, batch=batch))
    if channels_last:
        args[0] = args[0].contiguous(memory_format=torch.channels_last)
    if window > MAX_RESOLUTION:
        _refused(lambda: cascaded_group_attention(*args, backend="triton"))
        return
    expected = cascaded_group_attention_reference(CascadedGroupAttentionArgs(*cast(args, torch.float64)))
    with torch.no_grad():
        out = cascaded_group_attention(*args, backend="triton")
        eager = cascaded_group_attention(*args, backend="torch")
    assert out.dtype == dtype and out.shape == expected.shape and torch.isfinite(out).all()
    assert_within_twice_eager(out, eager, expected, dtype, whole_map_terms(config, window))
