"""The CUDA backend of evit::conv_bn_act (csrc/conv_bn_act_cuda.cu, exposed as evit::depthwise_conv_cuda): on a GPU,
the depthwise conv against a float64 reference over kernel sizes, strides, activations, dtypes, layouts and odd
shapes; here, without a GPU, its registration, meta implementation and refusals."""

from __future__ import annotations

import pytest
import torch

from evit_kernels import _extension, dispatch
from evit_kernels.ops.conv_bn_act import (
    ACTIVATIONS,
    ConvBnActArgs,
    conv_bn_act,
    conv_bn_act_reference,
    conv_output_shape,
)
from tests.numerics import assert_within_twice_eager, in_layout, poison_next_allocation

needs_extension = pytest.mark.skipif(_extension.load_error() is not None,
                                     reason=f"evit_kernels._C is not built: {_extension.load_error()}")

OP = "conv_bn_act"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
CPU_ONLY = "tensors on cpu (the cuda kernels need CUDA tensors)"

# (batch, channels, H, W, k, stride, padding, bias, residual, layout). "misaligned" is channels-last one element
# past an aligned address, which must keep the kernel off its vector loads.
SHAPES = {
    "map_1x1": (3, 5, 1, 1, 3, 1, 1, True, True, "channels_last"),  # also contiguous: the NCHW tiling
    "batch1_vector_loads": (1, 64, 14, 14, 3, 1, 1, True, True, "channels_last"),
    "k7_s2_56kb_tile": (2, 48, 28, 28, 7, 2, 3, True, True, "channels_last"),
    "c36_partial_channel_group": (2, 36, 9, 7, 5, 2, 2, False, True, "channels_last"),
    "c33_scalar_loads": (2, 33, 12, 11, 3, (1, 2), (2, 1), True, True, "channels_last"),
    "misaligned": (2, 40, 11, 13, 3, 1, 1, True, True, "misaligned"),
    "nchw_many_tiles": (2, 3, 70, 45, 5, 1, 2, True, True, "contiguous"),
    "narrow_tall": (1, 2, 300, 1, 3, 1, 1, True, False, "contiguous"),
    "no_padding": (2, 6, 9, 10, 3, 1, 0, True, True, "contiguous"),
    "asymmetric_padding": (1, 5, 8, 9, 5, 1, (0, 3), True, True, "channels_last"),
    "padding_beyond_kernel": (2, 4, 5, 6, 3, 2, 4, True, True, "contiguous"),  # some outputs see only padding
    "strided_input": (2, 4, 10, 8, 5, 1, 2, False, True, "strided"),
}


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout != "misaligned":
        return in_layout(t, layout)
    batch, channels, height, width = t.shape
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:]
    out = flat.as_strided(t.shape, (height * width * channels, 1, width * channels, channels))
    return out.copy_(t)


def _pair(v: int | tuple[int, int]) -> list[int]:
    return [v, v] if isinstance(v, int) else list(v)


def _inputs(batch, channels, height, width, k, stride, padding, bias, residual, layout, dtype, device="cuda",
            residual_layout=None):
    """The op's arguments (x, weight, bias, stride, padding, dilation, groups, activation placeholder, residual)."""
    stride, padding = _pair(stride), _pair(padding)
    x = _layout(torch.randn(batch, channels, height, width, device=device).to(dtype), layout)
    weight = (torch.randn(channels, 1, k, k, device=device) / k).to(dtype)
    b = torch.randn(channels, device=device).to(dtype) if bias else None
    r = None
    if residual:
        shape = conv_output_shape(x, weight, stride, padding, [1, 1])
        r = _layout(torch.randn(shape, device=device).to(dtype), residual_layout or layout)
    return [x, weight, b, stride, padding, [1, 1], channels, "none", r]


def _check_against_float64(args, activation):
    args = list(args)
    args[7] = activation
    dtype = args[0].dtype
    expected = conv_bn_act_reference(ConvBnActArgs(*[a.double() if isinstance(a, torch.Tensor) else a for a in args]))
    eager = conv_bn_act_reference(ConvBnActArgs(*args))
    poisoned = poison_next_allocation(expected.shape, dtype)
    out = conv_bn_act(*args, backend="cuda")
    assert out.data_ptr() == poisoned, "the output did not reuse the NaN-poisoned block"
    assert out.dtype == dtype and out.shape == eager.shape and out.stride() == eager.stride()
    assert torch.isfinite(out).all()
    assert_within_twice_eager(out, eager, expected, dtype, args[1][0].numel())


# --- on a GPU ------------------------------------------------------------------------------------------------

@pytest.mark.numerics
@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k", [3, 5, 7])
def test_within_twice_eager_error(k, stride, activation, dtype, layout):
    # 40 channels: a full and a partial group of 32; 13×11: prime, non-square, several NCHW tiles at stride 1.
    _check_against_float64(_inputs(2, 40, 13, 11, k, stride, k // 2, True, True, layout, dtype), activation)


@pytest.mark.numerics
@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", SHAPES)
def test_odd_shapes_within_twice_eager_error(name, dtype):
    layout = SHAPES[name][-1]
    # The residual in the other layout: it is read through its strides.
    other = "contiguous" if layout in ("channels_last", "misaligned") else "channels_last"
    _check_against_float64(_inputs(*SHAPES[name], dtype, residual_layout=other), "hardswish")


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_nan_propagates_as_in_pytorch(activation, layout):
    args = _inputs(2, 40, 9, 8, 3, 1, 1, True, True, layout, torch.float32)
    args[0][0, 3, 4, 2] = float("nan")
    args[0][1, 35, 0, 7] = float("nan")
    args[7] = activation
    out = conv_bn_act(*args, backend="cuda")
    eager = conv_bn_act_reference(ConvBnActArgs(*args))
    assert eager.isnan().sum() == 9 + 4  # every activation keeps NaN: the 3×3 windows around them, one at a corner
    assert torch.equal(out.isnan(), eager.isnan())


# exp(-y) overflowing to inf is how silu and tanh-GELU saturate to -0 for very negative y.
@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "silu", "hardswish"])
def test_large_activations_stay_finite_in_fp16(activation):
    args = _inputs(2, 40, 9, 8, 5, 1, 2, True, True, "channels_last", torch.float16)
    args[0] = args[0] * 200
    _check_against_float64(args, activation)


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_reference_gradients_after_cuda_forward(layout):
    args = _inputs(2, 40, 9, 8, 5, 2, 2, True, True, layout, torch.float32)
    tensors = [0, 1, 2, 8]
    leaves = [args[i].detach().clone().requires_grad_() for i in tensors]
    exact = [args[i].detach().double().requires_grad_() for i in tensors]
    for chosen, backend in ((leaves, "cuda"), (exact, "torch")):
        call = list(args)
        for i, t in zip(tensors, chosen):
            call[i] = t
        call[7] = "gelu"
        conv_bn_act(*call, backend=backend).sum().backward()  # a stride-0 grad_output
    for got, ref in zip(leaves, exact):
        torch.testing.assert_close(got.grad.double(), ref.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck_on_gpu(layout):
    x, weight, bias, stride, padding, _, _, _, residual = _inputs(2, 40, 9, 8, 3, 2, 1, True, True, layout,
                                                                  torch.float32)
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.evit.depthwise_conv_cuda, (x, weight, bias, stride, padding, "relu", residual),
                          test_utils=tests)
    x, weight, bias, residual = (t.detach().clone().requires_grad_() for t in (x, weight, bias, residual))
    torch.library.opcheck(torch.ops.evit.conv_bn_act.default,
                          (x, weight, bias, stride, padding, [1, 1], 40, "relu", residual, "cuda"),
                          test_utils=(*tests, "test_autograd_registration"))


@pytest.mark.gpu
@needs_extension
def test_empty_batch():
    args = _inputs(0, 8, 7, 7, 3, 1, 1, True, True, "channels_last", torch.float16)
    assert conv_bn_act(*args, backend="cuda").shape == (0, 8, 7, 7)


# --- without a GPU ---------------------------------------------------------------------------------------------

@needs_extension
def test_schema_is_registered():
    assert str(torch.ops.evit.depthwise_conv_cuda.default._schema) == (
        "evit::depthwise_conv_cuda(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding, "
        "str activation, Tensor? residual) -> Tensor")


@needs_extension
@pytest.mark.parametrize("layout, shape, k, stride, padding", [
    ("contiguous", (2, 5, 9, 7), 3, [1, 1], [1, 1]),
    ("channels_last", (2, 5, 9, 7), 5, [2, 1], [0, 3]),
    ("channels_last", (3, 6, 1, 1), 3, [1, 1], [1, 1]),  # a 1×1 map is contiguous too: the output is NCHW
    ("strided", (1, 4, 8, 10), 7, [2, 2], [3, 3]),
])
def test_meta_gives_the_ops_shape_dtype_and_layout(layout, shape, k, stride, padding):
    x = in_layout(torch.randn(shape), layout)
    weight = torch.randn(shape[1], 1, k, k)
    expected = conv_bn_act_reference(ConvBnActArgs(x, weight, None, stride, padding, [1, 1], shape[1], "none"))
    meta_x = torch.empty_strided(x.shape, x.stride(), dtype=torch.bfloat16, device="meta")
    out = torch.ops.evit.depthwise_conv_cuda(meta_x, weight.to("meta", torch.bfloat16), None, stride, padding,
                                             "none", None)
    assert out.device.type == "meta" and out.dtype == torch.bfloat16
    assert out.shape == expected.shape and out.stride() == expected.stride()


@needs_extension
def test_meta_traces_with_symbolic_shapes():
    from torch.fx.experimental.proxy_tensor import make_fx

    x = torch.randn(2, 6, 9, 7).contiguous(memory_format=torch.channels_last)
    op = lambda x, w: torch.ops.evit.depthwise_conv_cuda(x, w, None, [2, 1], [2, 2], "silu", None)
    graph = make_fx(op, tracing_mode="symbolic")(x, torch.randn(6, 1, 5, 5))
    out = next(n for n in graph.graph.nodes if n.target is torch.ops.evit.depthwise_conv_cuda.default).meta["val"]
    assert isinstance(out.shape[2], torch.SymInt)
    # The strides themselves: torch 2.11's is_contiguous(memory_format=...) answers False on a symbolic height.
    assert out.shape == (2, 6, 5, 7) and out.stride() == (6 * 5 * 7, 1, 7 * 6, 6)  # channels-last


@needs_extension
def test_extension_op_rejects_cpu_tensors():
    x, weight, bias, stride, padding, *_ = _inputs(1, 4, 5, 5, 3, 1, 1, True, False, "contiguous", torch.float32,
                                                   device="cpu")
    with pytest.raises(NotImplementedError, match="depthwise_conv_cuda"):
        torch.ops.evit.depthwise_conv_cuda(x, weight, bias, stride, padding, "relu", None)


def _reasons(args) -> list[str]:
    return dispatch.get(OP, "cuda").input_reasons(ConvBnActArgs(*args))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("k, stride", [(3, 1), (5, 2), (7, (1, 2))])
def test_reasons_accept_every_supported_depthwise_conv_but_for_the_device(k, stride, dtype, layout):
    args = _inputs(2, 6, 9, 8, k, stride, k // 2, True, True, layout, dtype, device="cpu")
    args[0].requires_grad_()  # the op's backward is the reference's VJP whichever backend ran forward
    assert _reasons(args) == [CPU_ONLY]


def _conv_args(channels=4, out_channels=None, k=3, groups=None, stride=1, padding=1, dilation=1,
               dtype=torch.float32, kernel=None):
    x = torch.randn(1, channels, 6, 5, dtype=dtype)
    out_channels = out_channels or channels
    groups = groups or channels
    weight = torch.randn(out_channels, channels // groups, *(kernel or (k, k)), dtype=dtype)
    return [x, weight, None, _pair(stride), _pair(padding), _pair(dilation), groups, "relu", None]


DEPTHWISE_ONLY = "the CUDA kernel takes a depthwise 3×3, 5×5 or 7×7 conv with stride 1 or 2"
UNSUPPORTED = {
    "pointwise": (dict(out_channels=8, groups=1, k=1, padding=0), DEPTHWISE_ONLY),
    "depthwise_1x1": (dict(k=1, padding=0), DEPTHWISE_ONLY),
    "dense_3x3": (dict(groups=1), DEPTHWISE_ONLY),
    "grouped": (dict(out_channels=6, groups=2), DEPTHWISE_ONLY),
    "k4": (dict(k=4, padding=2), DEPTHWISE_ONLY),
    "k9": (dict(k=9, padding=4), DEPTHWISE_ONLY),
    "non_square": (dict(kernel=(3, 5)), DEPTHWISE_ONLY),
    "stride3": (dict(stride=3), DEPTHWISE_ONLY),
    "dilation2": (dict(dilation=2, padding=2), "dilation [2, 2] (the CUDA kernel takes dilation 1)"),
    "float64": (dict(dtype=torch.float64), "torch.float64 inputs (the cuda kernels take float32, float16 and"),
}


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_reasons_refuse_unsupported_convs(name):
    change, message = UNSUPPORTED[name]
    reasons = _reasons(_conv_args(**change))
    assert reasons[0] == CPU_ONLY and len(reasons) == 2
    assert message in reasons[1]


def test_reasons_refuse_maps_beyond_32_bit_coordinates():
    x = torch.zeros(1, 1, 1, 1).expand(1, 4, 1, 2**28)  # no memory behind it
    refused = _reasons([x, torch.randn(4, 1, 3, 3), None, [1, 1], [1, 1], [1, 1], 4, "relu", None])
    assert "a map or padding of 2^28 pixels or more" in "; ".join(refused)


def test_explicit_request_without_a_gpu_raises_and_auto_falls_back(pretend_measured):
    if torch.cuda.is_available():
        pytest.skip("checks the behaviour without a GPU")
    args = _inputs(1, 4, 6, 5, 3, 1, 1, True, True, "channels_last", torch.float32, device="cpu")
    with pytest.raises(dispatch.BackendUnavailable, match="backend 'cuda' was requested"):
        conv_bn_act(*args, backend="cuda")
    # Even measured fastest, the cuda backend must be passed over here.
    pretend_measured(OP, "cuda")
    assert dispatch.choose(ConvBnActArgs(*args)).name != "cuda"
    torch.testing.assert_close(conv_bn_act(*args), conv_bn_act_reference(ConvBnActArgs(*args)))


def test_cuda_backend_is_registered_but_not_a_default():
    assert dispatch.get(OP, "cuda") is not None
    if not torch.cuda.is_available():
        assert dispatch.status(OP)["cuda"][-1].startswith("not measured faster than the reference for any shape")
