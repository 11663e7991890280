"""Backend choice: automatic choice, explicit requests (argument, EVIT_BACKEND, per op) and their errors."""

import pytest
import torch
from timm.models.efficientvit_mit import ConvNormAct
from torch.autograd import forward_ad
from torch.utils._python_dispatch import TorchDispatchMode

from evit_kernels import dispatch, measured
from evit_kernels.nn.conv_bn_act import FusedConvNormAct
from evit_kernels.ops.conv_bn_act import ConvBnActArgs, conv_bn_act
from evit_kernels.ops.relu_linear_attention import ReluLinearAttentionArgs, relu_linear_attention


def test_requested_resolves_argument_then_environment(monkeypatch):
    monkeypatch.delenv("EVIT_BACKEND", raising=False)
    assert dispatch.requested("conv_bn_act") == "auto"
    monkeypatch.setenv("EVIT_BACKEND", "torch")
    assert dispatch.requested("conv_bn_act") == "torch"
    assert dispatch.requested("conv_bn_act", "triton") == "triton"  # the argument wins
    monkeypatch.setenv("EVIT_BACKEND", "relu_linear_attention=triton, conv_bn_act=torch")
    assert dispatch.requested("relu_linear_attention") == "triton"
    assert dispatch.requested("conv_bn_act") == "torch"
    assert dispatch.requested("cascaded_group_attention") == "auto"
    monkeypatch.setenv("EVIT_BACKEND", "fast")
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        dispatch.requested("conv_bn_act")


def test_automatic_choice_never_picks_an_unmeasured_kernel(monkeypatch):
    monkeypatch.delenv("EVIT_BACKEND", raising=False)
    qkv = torch.randn(1, 24, 3, 3)
    assert dispatch.choose(ReluLinearAttentionArgs(qkv, [], 8, 1e-5)).name == "torch"
    statuses = dispatch.status("relu_linear_attention")
    assert statuses["torch"] == []
    assert statuses["triton"][-1].startswith("not measured faster than the reference for any shape on this machine")


def test_automatic_choice_follows_the_measured_table_per_gpu_and_shape_class(monkeypatch):
    """The table names a GPU model, an op and a shape class; any other GPU, shape class or op gets the reference."""
    monkeypatch.delenv("EVIT_BACKEND", raising=False)
    measured_args = ReluLinearAttentionArgs(torch.randn(2, 24, 3, 3), [], 8, 1e-5)
    other_resolution = ReluLinearAttentionArgs(torch.randn(2, 24, 4, 4), [], 8, 1e-5)
    other_batch_bucket = ReluLinearAttentionArgs(torch.randn(5, 24, 3, 3), [], 8, 1e-5)
    same_bucket = ReluLinearAttentionArgs(torch.randn(3, 24, 3, 3), [], 8, 1e-5)
    assert same_bucket.shape_class() == measured_args.shape_class() != other_batch_bucket.shape_class()
    table = {"Some GPU": {"ops": {"relu_linear_attention": {measured_args.shape_class(): "triton"}}}}
    monkeypatch.setattr(measured, "table", lambda: table)
    monkeypatch.setattr(measured, "gpu_name", lambda device=None: "Some GPU")
    assert measured.fastest(same_bucket) == "triton"
    # The interpreter stands in for the GPU here: the measured kernel is chosen where the table names it.
    assert dispatch.choose(same_bucket).name == "triton"
    assert dispatch.choose(other_resolution).name == "torch"
    assert dispatch.choose(other_batch_bucket).name == "torch"
    assert dispatch.status("relu_linear_attention")["triton"] == []
    monkeypatch.setattr(measured, "gpu_name", lambda device=None: "Another GPU")
    assert dispatch.choose(same_bucket).name == "torch"


def test_environment_request_reaches_the_op(monkeypatch):
    monkeypatch.setenv("EVIT_BACKEND", "cuda")
    with pytest.raises(dispatch.BackendUnavailable, match="backend 'cuda' was requested"):
        relu_linear_attention(torch.randn(1, 24, 3, 3), [], 8, 1e-5)


def test_experimental_choice_takes_unmeasured_kernels_where_they_apply(monkeypatch):
    monkeypatch.delenv("EVIT_BACKEND", raising=False)
    pointwise = (torch.randn(1, 8, 3, 3), torch.randn(4, 8, 1, 1), None, [1, 1], [0, 0], [1, 1], 1, "none", None)
    dense = (torch.randn(1, 8, 5, 5), torch.randn(4, 8, 3, 3), None, [1, 1], [1, 1], [1, 1], 1, "none", None)
    assert dispatch.choose(ConvBnActArgs(*pointwise)).name == "torch"  # auto: nothing is measured here
    # The interpreter stands in for a GPU here: the Triton 1×1 kernel takes the first; no kernel takes a dense 3×3.
    assert dispatch.choose(ConvBnActArgs(*pointwise), "experimental").name == "triton"
    assert dispatch.choose(ConvBnActArgs(*dense), "experimental").name == "torch"
    monkeypatch.setenv("EVIT_BACKEND", "conv_bn_act=experimental")
    assert dispatch.choose(ConvBnActArgs(*pointwise)).name == "triton"


@pytest.mark.parametrize("request_, message", [
    ("conv_bn_act=triton, convbnact=torch", "unknown op 'convbnact'"),
    ("triton,ffn=torch", "'triton' is not op=backend"),
    ("ffn=fast", "unknown backend 'fast'"),
])
def test_malformed_per_op_requests_raise(monkeypatch, request_, message):
    monkeypatch.setenv("EVIT_BACKEND", request_)
    with pytest.raises(ValueError, match=message):
        dispatch.requested("conv_bn_act")


def test_per_op_request_tolerates_spaces(monkeypatch):
    monkeypatch.setenv("EVIT_BACKEND", " conv_bn_act = torch , ffn=triton")
    assert dispatch.requested("conv_bn_act") == "torch"
    assert dispatch.requested("ffn") == "triton"


@pytest.mark.parametrize("request_, error, message", [
    (None, TypeError, "backend must be a string"),
    ("fast", ValueError, "unknown backend 'fast'"),
    ("conv_bn_act=fast", ValueError, "unknown backend 'fast'"),
    ("convbnact=torch", ValueError, "unknown op 'convbnact'"),
])
def test_a_fused_module_checks_its_backend_when_set(request_, error, message):
    module = FusedConvNormAct(ConvNormAct(8, 8, 3))
    with pytest.raises(error, match=message):
        FusedConvNormAct(ConvNormAct(8, 8, 3), backend=request_)
    with pytest.raises(error, match=message):
        module.backend = request_
    assert module.backend == "auto"
    module.backend = "conv_bn_act=torch"
    assert module.backend == "conv_bn_act=torch"


class _DispatchedOps(TorchDispatchMode):
    """The ops that reach the dispatcher below autograd, by name."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_a_kernel_goes_through_its_library_op_only_where_something_records():
    """The custom op's dispatch is paid where autograd, torch.compile or a tracer needs its node, not on every
    inference call."""
    x = torch.randn(1, 8, 6, 6)
    weight = torch.randn(16, 8, 1, 1, requires_grad=True)
    for grad, expected in ((False, False), (True, True)):
        with torch.set_grad_enabled(grad), _DispatchedOps() as seen:
            out = conv_bn_act(x, weight, None, activation="relu", backend="triton")
        assert ("evit.conv_bn_act.default" in seen.names) is expected, seen.names
        assert out.requires_grad is grad
        torch.testing.assert_close(out, torch.relu(torch.nn.functional.conv2d(x, weight)), rtol=1e-5, atol=1e-5)


def test_forward_mode_tangents_never_reach_a_kernel():
    """The kernels have no JVP: a dual input goes to the reference (whose ops carry the tangent), or raises when a
    kernel is requested by name, instead of an output without its tangent."""
    x, tangent = torch.randn(1, 8, 6, 6), torch.randn(1, 8, 6, 6)
    weight = torch.randn(16, 8, 1, 1)
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(x, tangent)
        with pytest.raises(dispatch.BackendUnavailable, match="forward-mode AD"):
            conv_bn_act(dual, weight, None, backend="triton")
        out = forward_ad.unpack_dual(conv_bn_act(dual, weight, None, backend="experimental"))
    torch.testing.assert_close(out.tangent, torch.nn.functional.conv2d(tangent, weight), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.primal, torch.nn.functional.conv2d(x, weight), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [
    lambda: torch.empty(2, 3, 5, 7),
    lambda: torch.empty(2, 3, 5, 7).to(memory_format=torch.channels_last),
    lambda: torch.empty(2, 6, 5, 7)[:, ::2, 1:],
    lambda: torch.empty(3, 1, 1).expand(3, 4, 5),
    lambda: torch.empty(4, 6).t(),
    lambda: torch.empty(1, 8, 1, 1),
    lambda: torch.empty(5),
])
def test_span_reaches_one_past_the_largest_offset(make):
    """The 32-bit offset check's span is one past the largest element offset the strides reach (counted here by
    enumerating every index), for contiguous, channels-last, sliced, expanded and transposed tensors."""
    t = make()
    offsets = torch.zeros((), dtype=torch.long)
    for dim, (size, stride) in enumerate(zip(t.shape, t.stride())):
        shape = [1] * t.dim()
        shape[dim] = size
        offsets = offsets + torch.arange(size).reshape(shape) * stride
    assert dispatch.span(t) == int(offsets.max()) + 1
