"""multiscale_aggregation (depthwise k×k then grouped 1×1) against nn.Conv2d layers."""

import pytest
import torch
from torch import nn

from evit_kernels import dispatch
from evit_kernels.ops.multiscale_aggregation import multiscale_aggregation


def aggregation_inputs(kernel=5, channels=24, groups=6, shape=(5, 7), dtype=torch.float64, bias=True):
    sequential = nn.Sequential(nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels, bias=bias),
                               nn.Conv2d(channels, channels, 1, groups=groups, bias=bias)).to(dtype)
    dw, pw = sequential
    qkv = torch.randn(2, channels, *shape, dtype=dtype)
    return sequential, (qkv, dw.weight, dw.bias, pw.weight, pw.bias, groups)


@pytest.mark.parametrize("shape", [(5, 7), (2, 3), (1, 1)])
@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("bias", [True, False])
def test_aggregation_matches_nn_conv_layers(shape, kernel, bias):
    sequential, args = aggregation_inputs(kernel, shape=shape, bias=bias)
    with torch.no_grad():
        expected = sequential(args[0])
        torch.testing.assert_close(multiscale_aggregation(*args), expected, rtol=1e-12, atol=1e-12)
        fp32_args = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
        out = multiscale_aggregation(*fp32_args)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_aggregation_low_precision(dtype):
    sequential, args = aggregation_inputs(3, dtype=dtype)
    with torch.no_grad():
        out = multiscale_aggregation(*args)
        expected = sequential.double()(args[0].double())
    assert out.dtype == dtype and out.isfinite().all()
    torch.testing.assert_close(out.double(), expected, rtol=0.05, atol=0.05)


def test_aggregation_channels_last_input_gives_nchw_output():
    sequential, (qkv, *rest) = aggregation_inputs(5)
    out = multiscale_aggregation(qkv.contiguous(memory_format=torch.channels_last), *rest)
    assert out.is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(out, sequential(qkv), rtol=1e-12, atol=1e-12)


def test_aggregation_gradcheck():
    _, (qkv, dw_w, dw_b, pw_w, pw_b, groups) = aggregation_inputs(3, channels=6, groups=3, shape=(3, 4))
    tensors = [t.detach().requires_grad_() for t in (qkv, dw_w, dw_b, pw_w, pw_b)]
    assert torch.autograd.gradcheck(lambda *t: multiscale_aggregation(*t, groups), tensors)


def test_aggregation_is_no_library_op():
    """Only the reference exists, so it runs as plain PyTorch ops: no torch.library op to keep in step."""
    assert not hasattr(torch.ops.evit, "multiscale_aggregation")


def test_aggregation_bad_inputs_raise_clear_errors():
    _, (qkv, dw_w, dw_b, pw_w, pw_b, groups) = aggregation_inputs(5)
    with pytest.raises(ValueError, match="qkv must be"):
        multiscale_aggregation(qkv[0], dw_w, dw_b, pw_w, pw_b, groups)
    with pytest.raises(ValueError, match="k odd"):
        multiscale_aggregation(qkv, dw_w[..., :4, :4], dw_b, pw_w, pw_b, groups)
    with pytest.raises(ValueError, match="dw_weight must be"):
        multiscale_aggregation(qkv[:, :12], dw_w, dw_b, pw_w, pw_b, groups)
    with pytest.raises(ValueError, match="groups=5"):
        multiscale_aggregation(qkv, dw_w, dw_b, pw_w, pw_b, 5)
    with pytest.raises(ValueError, match="pw_weight must be"):
        multiscale_aggregation(qkv, dw_w, dw_b, pw_w, pw_b, 3)
    with pytest.raises(ValueError, match="pw_bias must have"):
        multiscale_aggregation(qkv, dw_w, dw_b, pw_w, pw_b[:3], groups)
    with pytest.raises(TypeError, match="dw_weight has dtype"):
        multiscale_aggregation(qkv, dw_w.float(), dw_b, pw_w, pw_b, groups)


def test_aggregation_explicit_triton_request_is_unavailable():
    _, args = aggregation_inputs(3)
    with pytest.raises(dispatch.BackendUnavailable, match="triton"):
        multiscale_aggregation(*args, backend="triton")
