"""FusedLiteMLA against timm's and efficientsam's LiteMLA, and the multiscale_aggregation function it uses."""

import copy
import math

import pytest
import timm.models.efficientvit_mit as timm_mit
import torch
from efficientsam.models.nn.ops import LiteMLA as MitLiteMLA
from torch import nn

from evit_kernels import dispatch
from evit_kernels.nn._base import Unsupported
from evit_kernels.nn.lite_mla import FusedLiteMLA
from tests.numerics import assert_within_twice_eager, max_err, rounding_floor

CHANNELS = 32


def build(kind, dim=8, scales=(5,), **kwargs):
    """A LiteMLA with randomised BatchNorm statistics and affine parameters (fresh ones hide mistakes)."""
    if kind == "timm":
        module = timm_mit.LiteMLA(CHANNELS, CHANNELS, dim=dim, scales=scales, **kwargs)
    else:
        module = MitLiteMLA(CHANNELS, CHANNELS, dim=dim, scales=scales, **kwargs)
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            nn.init.uniform_(bn.weight, 0.5, 1.5)
            nn.init.uniform_(bn.bias, -1, 1)
    return module


def original_and_fused(original):
    return original, FusedLiteMLA(copy.deepcopy(original))


@pytest.mark.parametrize("shape", [(5, 7), (2, 2), (1, 1)])
@pytest.mark.parametrize("scales", [(), (5,), (3, 5)])
@pytest.mark.parametrize("dim", [8, 16, 32])
@pytest.mark.parametrize("kind", ["timm", "mit"])
def test_eval_matches_original(kind, dim, scales, shape):
    """timm eps 1e-5, mit-han-lab eps 1e-15; a 2×2 or 1×1 map sends mit-han-lab down its quadratic branch.
    In float64 the fused module matches :func:`float64_reference` to float64 rounding."""
    original, fused = original_and_fused(build(kind, dim, scales).eval())
    fused.eval()
    x = torch.randn(2, CHANNELS, *shape)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), original(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused.double()(x.double()), float64_reference(original)(x.double()),
                                   rtol=1e-10, atol=1e-10)


def rebuilt(original, family):
    """``family``'s LiteMLA (``timm_mit.LiteMLA`` or ``MitLiteMLA``) with ``original``'s weights, eps and mode."""
    scales = tuple(scale[0].kernel_size[0] for scale in original.aggreg)
    use_bias = original.qkv.conv.bias is not None
    module = family(CHANNELS, CHANNELS, dim=original.dim, scales=scales, eps=original.eps, use_bias=use_bias)
    module.load_state_dict(original.state_dict())
    return module.train(original.training)


def float64_reference(original):
    """mit-han-lab's LiteMLA in float64 (timm's attention runs in fp32 even for float64 inputs)."""
    return rebuilt(original, MitLiteMLA).double()


def train_step(module, x, weight):
    """Loss, the input's gradient, each parameter's gradient and each buffer after one forward/backward."""
    leaf = x.clone().requires_grad_()
    loss = (module(leaf) * weight).sum()
    loss.backward()
    results = {"loss": loss.detach(), "x.grad": leaf.grad}
    results.update({f"{name}.grad": param.grad for name, param in module.named_parameters()})
    results.update(dict(module.named_buffers()))
    return results


@pytest.mark.numerics
@pytest.mark.parametrize("shape", [(5, 7), (2, 2)])
@pytest.mark.parametrize("scales", [(), (3, 5)])
@pytest.mark.parametrize("kind", ["timm", "mit"])
def test_train_matches_original(kind, scales, shape):
    """Against float64: the fused module's loss, gradients (input and every parameter) and BatchNorm running
    statistics are at most about 2× as far off as eager fp32. Eager is the original and timm's LiteMLA with the
    same weights: at N <= d mit-han-lab switches to its quadratic form, which rounds differently (often better)
    than the linear form that timm, the op and any kernel compute."""
    original, fused = original_and_fused(build(kind, 8, scales, use_bias=True).train())
    eager_linear = rebuilt(original, timm_mit.LiteMLA)
    reference = float64_reference(original)
    x, weight = torch.randn(2, CHANNELS, *shape), torch.randn(2, CHANNELS, *shape)
    exact = train_step(reference, x.double(), weight.double())
    ours = train_step(fused.train(), x, weight)
    eager_runs = [train_step(original, x, weight), train_step(eager_linear, x, weight)]
    assert exact.keys() == ours.keys() == eager_runs[0].keys() == eager_runs[1].keys()
    assert ours["proj.norm.num_batches_tracked"] == eager_runs[0]["proj.norm.num_batches_tracked"] == 1
    # The chain behind the loss: qkv conv, aggregation, attention over the tokens, projection, batch statistics.
    tokens = math.prod(shape)
    terms = 2 * CHANNELS + max(scales, default=0) ** 2 + 8 + tokens + 8 + 2 * tokens
    for name, expected in exact.items():
        if expected.is_floating_point():
            eager_error = max(max_err(eager[name], expected) for eager in eager_runs)
            floor = rounding_floor(expected, torch.float32, terms)
            assert max_err(ours[name], expected) <= 2 * eager_error + floor, name


def test_channels_last_input():
    original, fused = original_and_fused(build("timm", 8, (3, 5)).eval())
    x = torch.randn(1, CHANNELS, 6, 9)
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(x.contiguous(memory_format=torch.channels_last)), original(x),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.numerics
def test_fp16_large_activations_with_mit_eps():
    """q, k, v ~ 300 and eps 1e-15 on a 2×2 map: efficientsam's quadratic branch overflows fp16 (NaN); the fused
    module stays finite and at most 2× as far from fp32 as timm's eager fp16 path (which upcasts the attention)."""
    mit = build("mit", 8, (5,)).eval()
    with torch.no_grad():
        mit.qkv.conv.weight.mul_(300.0)
    timm_eager = build("timm", 8, (5,), eps=mit.eps).eval()
    timm_eager.load_state_dict(mit.state_dict())
    x = torch.randn(2, CHANNELS, 2, 2).half()
    with torch.no_grad():
        expected = copy.deepcopy(mit).float()(x.float())
        fused = FusedLiteMLA(copy.deepcopy(mit)).half().eval()
        out = fused(x)
        assert not mit.half()(x).isfinite().all()
        eager = timm_eager.half()(x)
    assert out.dtype == torch.float16 and out.isfinite().all()
    assert_within_twice_eager(out, eager, expected, torch.float16, terms=2 * CHANNELS + 5 * 5 + 8 + 4 + 8)


def test_state_dict_and_shared_parameters_and_restore():
    original = build("mit", 8, (3, 5))
    keys = {name: tensor.shape for name, tensor in original.state_dict().items()}
    fused = FusedLiteMLA(original)
    assert {name: tensor.shape for name, tensor in fused.state_dict().items()} == keys
    for (name, param), (fused_name, fused_param) in zip(original.named_parameters(), fused.named_parameters()):
        assert name == fused_name and param is fused_param
    assert fused.heads == 4 and fused.dim == 8 and fused.eps == original.eps
    assert fused.restore() is original


def _with_aggregation(module, index, *convs):
    module.aggreg[index] = nn.Sequential(*convs)
    return module


def _dw(channels=96, kernel=5, **kwargs):
    return nn.Conv2d(channels, channels, kernel, padding=kwargs.pop("padding", kernel // 2), groups=channels,
                     bias=False, **kwargs)


def _pw(channels=96, groups=12, **kwargs):
    return nn.Conv2d(channels, channels, 1, groups=groups, bias=False, **kwargs)


@pytest.mark.parametrize("break_it, reason", [
    (lambda m: setattr(m, "kernel_func", nn.GELU()) or m, "only nn.ReLU"),
    (lambda m: _with_aggregation(m, 0, _dw(kernel=4, padding=2), _pw()), "odd square kernel"),
    (lambda m: _with_aggregation(m, 0, _dw(stride=2), _pw()), "stride"),
    (lambda m: _with_aggregation(m, 0, _dw(dilation=2, padding=4), _pw()), "dilation"),
    (lambda m: _with_aggregation(m, 0, _dw(padding=1), _pw()), "padding"),
    (lambda m: _with_aggregation(m, 0, _dw(padding_mode="reflect"), _pw()), "padding mode"),
    (lambda m: _with_aggregation(m, 0, _dw(), _pw(groups=4)), "groups=12"),
    (lambda m: _with_aggregation(m, 0, _dw(), nn.BatchNorm2d(96)), "Sequential"),
    (lambda m: _with_aggregation(m, 0, _dw(), _pw(), nn.ReLU()), "Sequential"),
    (lambda m: _with_aggregation(m, 0, _dw(48), _pw(48, 6)), "channels"),
    (lambda m: setattr(m.proj, "conv", nn.Conv2d(48, 32, 1)) or m, "proj.conv takes 48"),
    (lambda m: setattr(m, "qkv", nn.Identity()) or m, "without a Conv2d"),
    (lambda m: setattr(m, "dim", 7) or m, "not a multiple of"),
    (lambda m: delattr(m, "eps") or m, "without attribute"),
])
def test_unsupported_configurations(break_it, reason):
    with pytest.raises(Unsupported, match=reason):
        FusedLiteMLA(break_it(build("timm", 8, (5,))))


def test_torch_compile_fullgraph():
    original, fused = original_and_fused(build("timm", 8, (5,)).eval())
    x = torch.randn(1, CHANNELS, 3, 5)
    compiled = torch.compile(fused.eval(), backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), original(x), rtol=1e-5, atol=1e-5)


def test_explicit_triton_request_raises_where_no_kernel_exists():
    """Training needs the multi-scale aggregation op, which has no Triton kernel: a request for Triton raises
    rather than running the reference unasked."""
    fused = FusedLiteMLA(build("mit", 8, (5,)), backend="triton")
    with pytest.raises(dispatch.BackendUnavailable, match="no triton implementation of multiscale_aggregation"):
        fused(torch.randn(1, CHANNELS, 3, 3))
