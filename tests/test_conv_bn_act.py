"""evit::conv_bn_act and FusedConvNormAct against float64 formulas and the original timm / efficientsam / Cream
conv blocks, in eval (folded BatchNorm) and train (batch statistics)."""

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from efficientsam.models.nn.ops import ConvLayer
from timm.layers import GELUTanh
from timm.models.efficientvit_mit import ConvNormAct
from timm.models.efficientvit_msra import ConvNorm, ResidualDrop
from torch import nn

import evit_kernels
from evit_kernels.nn import _fold as fold_module_file
from evit_kernels.nn import conv_bn_act as fused_module_file
from evit_kernels.nn._base import Unsupported
from evit_kernels.nn._fold import fold_bn_into
from evit_kernels.nn.conv_bn_act import FusedConvNormAct, FusedResidualConvNorm, activation_name
from evit_kernels.ops._library import autocast_inputs
from evit_kernels.ops.conv_bn_act import ACTIVATIONS, conv_bn_act
from tests.cream_style import Conv2d_BN, Residual
from tests.models import randomize_bn
from tests.numerics import assert_same_grads_and_buffers

# ---------------------------------------------------------------------------------------------------- the op

# Written from the definitions (not through torch.nn.functional's activations), evaluated in float64.
ACTIVATION_FORMULAS = {
    "none": lambda y: y,
    "relu": lambda y: y.clamp_min(0),
    "relu6": lambda y: y.clamp(0, 6),
    "hardswish": lambda y: y * (y + 3).clamp(0, 6) / 6,
    "gelu": lambda y: 0.5 * y * (1 + torch.erf(y / math.sqrt(2))),
    "gelu_tanh": lambda y: 0.5 * y * (1 + torch.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y**3))),
    "silu": lambda y: y / (1 + torch.exp(-y)),
}

# (batch, C_in, C_out, H, W, kernel, stride, padding, dilation, groups, bias, residual)
GEOMETRIES = {
    "dense_k1": (2, 3, 5, 3, 5, 1, 1, 0, 1, 1, True, True),
    "dense_k3_s2_prime": (2, 4, 6, 7, 5, 3, 2, 1, 1, 1, False, False),
    "dense_k3_dil2": (1, 3, 4, 9, 8, 3, 1, 2, 2, 1, True, False),
    "depthwise_k5": (2, 6, 6, 11, 13, 5, 1, 2, 1, 6, False, True),
    "depthwise_k7_s2": (1, 4, 4, 7, 9, 7, 2, 3, 1, 4, True, False),
    "grouped_k3": (1, 6, 9, 4, 3, 3, 1, 1, 1, 3, False, True),
    "map_1x1_k3": (3, 4, 4, 1, 1, 3, 1, 1, 1, 1, True, True),
    "map_1x1_k1_s2": (1, 5, 3, 1, 1, 1, 2, 0, 1, 1, False, False),
}


def make_op_inputs(geometry, dtype=torch.float32, requires_grad=False):
    batch, c_in, c_out, h, w, k, stride, pad, dil, groups, has_bias, has_residual = GEOMETRIES[geometry]
    x = torch.randn(batch, c_in, h, w, dtype=dtype)
    weight = torch.randn(c_out, c_in // groups, k, k, dtype=dtype) / math.sqrt(c_in // groups * k * k)
    bias = torch.randn(c_out, dtype=dtype) if has_bias else None
    out_hw = [(n + 2 * pad - dil * (k - 1) - 1) // stride + 1 for n in (h, w)]
    residual = torch.randn(batch, c_out, *out_hw, dtype=dtype) if has_residual else None
    tensors = [t.requires_grad_(requires_grad) if t is not None else None for t in (x, weight, bias, residual)]
    return tensors, dict(stride=stride, padding=pad, dilation=dil, groups=groups)


def float64_expected(x, weight, bias, residual, activation, stride, padding, dilation, groups):
    def f64(t):
        return None if t is None else t.double()

    y = ACTIVATION_FORMULAS[activation](F.conv2d(f64(x), f64(weight), f64(bias), stride, padding, dilation, groups))
    return y if residual is None else y + f64(residual)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_op_matches_float64_formula(geometry, activation):
    (x, weight, bias, residual), conv = make_op_inputs(geometry)
    out = conv_bn_act(x, weight, bias, activation=activation, residual=residual, **conv)
    expected = float64_expected(x, weight, bias, residual, activation, **conv)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_op_accepts_pairs_and_ints_alike():
    x, weight = torch.randn(2, 3, 8, 7), torch.randn(4, 3, 3, 2)
    out = conv_bn_act(x, weight, None, (2, 1), (1, 0), (1, 2), 1, "relu")
    torch.testing.assert_close(out, F.relu(F.conv2d(x, weight, None, (2, 1), (1, 0), (1, 2))))
    torch.testing.assert_close(conv_bn_act(x, weight, None, 2, 1, 1, 1, "none"),
                               conv_bn_act(x, weight, None, (2, 2), [1, 1], (1, 1), 1, "none"))


@pytest.mark.parametrize("geometry", ["depthwise_k5", "grouped_k3", "map_1x1_k3"])
def test_op_keeps_channels_last(geometry):
    (x, weight, bias, residual), conv = make_op_inputs(geometry)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    residual_cl = None if residual is None else residual.contiguous(memory_format=torch.channels_last)
    out = conv_bn_act(x_cl, weight, bias, activation="hardswish", residual=residual_cl, **conv)
    if x.shape[2:] != (1, 1):  # a 1x1 map is both layouts at once
        assert out.is_contiguous(memory_format=torch.channels_last)
    else:
        assert out.is_contiguous()
    torch.testing.assert_close(out.double(), float64_expected(x, weight, bias, residual, "hardswish", **conv),
                               rtol=1e-5, atol=1e-5)


def test_op_non_contiguous_inputs():
    (x, weight, bias, residual), conv = make_op_inputs("grouped_k3")
    x_strided = torch.randn(x.shape[0], x.shape[1], x.shape[2], 2 * x.shape[3])[..., ::2]
    residual_t = residual.transpose(2, 3).contiguous().transpose(2, 3)
    assert not x_strided.is_contiguous() and not residual_t.is_contiguous()
    out = conv_bn_act(x_strided, weight, bias, activation="silu", residual=residual_t, **conv)
    assert out.is_contiguous()
    torch.testing.assert_close(out.double(), float64_expected(x_strided, weight, bias, residual, "silu", **conv),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("geometry", ["dense_k1", "dense_k3_s2_prime", "depthwise_k5", "grouped_k3"])
def test_opcheck(geometry, dtype):
    (x, weight, bias, residual), conv = make_op_inputs(geometry, dtype, requires_grad=True)
    pairs = [[conv[name]] * 2 for name in ("stride", "padding", "dilation")]
    for layout in (torch.contiguous_format, torch.channels_last):
        args = (x.detach().contiguous(memory_format=layout).requires_grad_(), weight, bias, *pairs,
                conv["groups"], "gelu_tanh", residual, "torch")
        torch.library.opcheck(torch.ops.evit.conv_bn_act.default, args)


@pytest.mark.parametrize("activation", ["gelu", "hardswish", "silu", "relu6"])
@pytest.mark.parametrize("geometry", ["dense_k1", "dense_k3_s2_prime", "grouped_k3", "map_1x1_k3"])
def test_gradcheck(geometry, activation):
    (x, weight, bias, residual), conv = make_op_inputs(geometry, torch.float64, requires_grad=True)
    inputs = (x, weight, bias, residual)
    pairs = [[conv[name]] * 2 for name in ("stride", "padding", "dilation")]
    # Through the library op, so that its registered backward (not PyTorch's own autograd) is what is checked.
    fn = lambda x, w, b, r: torch.ops.evit.conv_bn_act(x, w, b, *pairs, conv["groups"], activation, r, "torch")
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def test_gradient_of_stride_zero_grad_output():
    (x, weight, bias, residual), conv = make_op_inputs("depthwise_k5", requires_grad=True)
    assert bias is None
    pairs = [[conv[name]] * 2 for name in ("stride", "padding", "dilation")]
    # Through the library op: its registered backward must take the expanded (stride-0) gradient.
    torch.ops.evit.conv_bn_act(x, weight, None, *pairs, conv["groups"], "gelu", residual, "torch").sum().backward()
    x64, w64, r64 = (t.detach().double().requires_grad_() for t in (x, weight, residual))
    float64_expected(x64, w64, None, r64, "gelu", **conv).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(residual.grad.double(), r64.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_op_low_precision(dtype):
    (x, weight, bias, residual), conv = make_op_inputs("grouped_k3")
    x = x * 50  # large activations: fp16 must still stay finite where fp32 is
    out = conv_bn_act(x.to(dtype), weight.to(dtype), activation="gelu_tanh", residual=residual.to(dtype), **conv)
    assert out.dtype == dtype and torch.isfinite(out).all()
    expected = float64_expected(x, weight, None, residual, "gelu_tanh", **conv)
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


@pytest.mark.parametrize("residual_dtype", [torch.bfloat16, torch.float32])
def test_op_cpu_autocast_bf16(residual_dtype):
    """x and the weights are cast, the residual is not: a bf16 residual gives bf16, an fp32 one fp32, as eager."""
    (x, weight, bias, residual), conv = make_op_inputs("dense_k1")
    residual = residual.to(residual_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv_bn_act(x, weight, bias, activation="relu", residual=residual, **conv)
    assert out.dtype == residual_dtype
    expected = float64_expected(x, weight, bias, residual, "relu", **conv)
    torch.testing.assert_close(out.double(), expected, rtol=3e-2, atol=3e-2)


def test_autocast_casts_a_tensor_given_twice_once():
    """A block that is its own residual (x given as x and as residual) gets one cast copy of x, not two."""
    (x, weight, _, _), _ = make_op_inputs("dense_k1")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast_x, cast_weight, cast_residual = autocast_inputs(x, weight, x)
    assert cast_x is cast_residual and cast_x.dtype == cast_weight.dtype == torch.bfloat16
    torch.testing.assert_close(cast_x, x.to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("change, message", [
    (dict(x=torch.randn(4, 6, 5)), "x must be"),
    (dict(x=torch.randn(2, 5, 5, 5)), "channels"),
    (dict(weight=torch.randn(4, 3, 3)), "weight must be"),
    (dict(groups=4), "groups"),
    (dict(bias=torch.randn(5)), "bias"),
    (dict(residual=torch.randn(2, 4, 4, 5)), "residual"),
    (dict(activation="gelu_erf"), "gelu_tanh"),  # the message lists the valid names
    (dict(stride=0), "stride"),
    (dict(padding=(1, 1, 1)), "padding"),
    (dict(x=torch.randn(2, 6, 2, 2), padding=0), "does not fit"),
])
def test_op_rejects_bad_input(change, message):
    args = dict(x=torch.randn(2, 6, 5, 5), weight=torch.randn(4, 3, 3, 3), bias=torch.randn(4), stride=1,
                padding=1, dilation=1, groups=2, activation="relu", residual=torch.randn(2, 4, 5, 5))
    args.update(change)
    with pytest.raises(ValueError, match=message):
        conv_bn_act(**args)


def test_op_rejects_dtype_mismatch():
    x, weight = torch.randn(1, 3, 4, 4), torch.randn(2, 3, 1, 1)
    with pytest.raises(TypeError, match="dtype"):
        conv_bn_act(x.double(), weight)
    with pytest.raises(TypeError, match="dtype"):
        conv_bn_act(x, weight, residual=torch.randn(1, 2, 4, 4, dtype=torch.float16))
    with pytest.raises(TypeError, match="not supported"):
        conv_bn_act(x.int(), weight.int())


# ------------------------------------------------------------------------------------------------ the module


ORIGINALS = {
    "timm_convnormact_hardswish_s2": lambda: ConvNormAct(6, 8, 3, stride=2, act_layer=nn.Hardswish),
    "timm_convnormact_geluTanh_depthwise": lambda: ConvNormAct(8, 8, 5, groups=8, act_layer=GELUTanh),
    "timm_convnormact_no_norm_bias_relu6": lambda: ConvNormAct(6, 8, 1, bias=True, norm_layer=None,
                                                                act_layer=nn.ReLU6),
    "timm_convnormact_norm_only": lambda: ConvNormAct(6, 8, 1, act_layer=None),
    "sam_convlayer_gelu_bias": lambda: ConvLayer(6, 8, 3, use_bias=True, act_func="gelu"),
    "sam_convlayer_no_norm_silu": lambda: ConvLayer(6, 8, 3, stride=2, use_bias=True, norm=None, act_func="silu"),
    "sam_convlayer_bare": lambda: ConvLayer(6, 8, 1, norm=None, act_func=None),
    "sam_convlayer_grouped_dilated_relu": lambda: ConvLayer(6, 9, 3, dilation=2, groups=3, act_func="relu"),
    "timm_convnorm_dw": lambda: ConvNorm(8, 8, 3, 1, 1, groups=8),
    "timm_convnorm_s2": lambda: ConvNorm(6, 8, 3, 2, 1),
    "cream_conv2d_bn": lambda: Conv2d_BN(6, 8, 1),
    "cream_conv2d_bn_dw_s2": lambda: Conv2d_BN(8, 8, 3, 2, 1, groups=8),
}


def make_pair(name, **bn_options):
    """(original, fused) with identical, independent parameters; ``fused`` wraps a deep copy."""
    original = ORIGINALS[name]()
    for bn in original.modules():
        if isinstance(bn, nn.BatchNorm2d):
            for key, value in bn_options.items():
                setattr(bn, key, value)
    randomize_bn(original)
    return original, FusedConvNormAct(copy.deepcopy(original))


def in_channels(module):
    return next(m for m in module.modules() if isinstance(m, nn.Conv2d)).in_channels


def batchnorm(module):
    return next((m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)), None)


@pytest.fixture
def op_calls(monkeypatch):
    """The module's calls into the op, as (args, kwargs) (to tell the folded path from the original sequence)."""
    calls = []

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return conv_bn_act(*args, **kwargs)

    monkeypatch.setattr(fused_module_file, "conv_bn_act", spy)
    return calls


@pytest.mark.parametrize("name", ORIGINALS)
def test_module_eval_matches_original(name, op_calls):
    original, fused = make_pair(name)
    original.eval(), fused.eval()
    x = torch.randn(2, in_channels(original), 9, 7)
    torch.testing.assert_close(fused(x), original(x), rtol=1e-5, atol=1e-5)
    assert len(op_calls) == 1
    x_cl = x.contiguous(memory_format=torch.channels_last)
    out_cl = fused(x_cl)
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out_cl, original(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("name", ORIGINALS)
def test_module_train_matches_original(name, momentum):
    original, fused = make_pair(name, momentum=momentum)
    original.train(), fused.train()
    for _ in range(3):
        x = torch.randn(3, in_channels(original), 6, 5)
        outputs, x_grads, grad_out = [], [], None
        for module in (original, fused):
            x_in = x.clone().requires_grad_()
            outputs.append(module(x_in))
            grad_out = torch.randn_like(outputs[0]) if grad_out is None else grad_out
            (outputs[-1] * grad_out).sum().backward()
            x_grads.append(x_in.grad)
        torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x_grads[1], x_grads[0], rtol=1e-5, atol=1e-5)
    assert_same_grads_and_buffers(original, fused)


def test_module_train_dropout_matches_original():
    original = randomize_bn(ConvNormAct(6, 8, 3, dropout=0.3, norm_layer=None, act_layer=nn.Hardswish))
    fused = FusedConvNormAct(copy.deepcopy(original)).train()
    x = torch.randn(2, 6, 5, 5)
    torch.manual_seed(1)
    expected = original.train()(x)
    torch.manual_seed(1)
    torch.testing.assert_close(fused(x), expected)


@pytest.mark.parametrize("eps", [1e-6, 1e-7, 1e-3])
def test_module_uses_bn_eps(eps):
    original, fused = make_pair("timm_convnorm_s2", eps=eps)
    with torch.no_grad():
        batchnorm(original).running_var.uniform_(1e-6, 1e-4)  # eps matters only next to a tiny variance
    batchnorm(fused).running_var.copy_(batchnorm(original).running_var)
    original.eval(), fused.eval()
    x = torch.randn(1, 6, 5, 5)
    torch.testing.assert_close(fused(x), original(x), rtol=1e-5, atol=1e-5)


@torch.no_grad()  # with gradients wanted the fold is recomputed anyway: test the cache
def test_module_refolds_when_eps_changes_after_a_forward():
    original, fused = make_pair("timm_convnormact_hardswish_s2")
    original.eval(), fused.eval()
    x = torch.randn(1, 6, 5, 5)
    before = fused(x)
    batchnorm(original).eps = batchnorm(fused).eps = 0.5
    after = fused(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, original(x), rtol=1e-5, atol=1e-5)


def test_module_bn_without_affine_folds(op_calls):
    original, fused = make_pair("cream_conv2d_bn_dw_s2")
    original.bn = nn.BatchNorm2d(8, affine=False)
    fused.bn = copy.deepcopy(randomize_bn(original.bn))
    original.eval(), fused.eval()
    x = torch.randn(2, 8, 7, 7)
    torch.testing.assert_close(fused(x), original(x), rtol=1e-5, atol=1e-5)
    assert len(op_calls) == 1


def test_module_bn_without_running_stats_uses_batch_stats_in_eval(op_calls):
    original, fused = make_pair("timm_convnormact_hardswish_s2")
    original.norm = nn.BatchNorm2d(8, track_running_stats=False)
    fused.norm = copy.deepcopy(randomize_bn(original.norm))
    original.eval(), fused.eval()
    x = torch.randn(3, 6, 6, 6)
    torch.testing.assert_close(fused(x), original(x), rtol=1e-5, atol=1e-5)
    assert op_calls == []


def test_module_sync_batchnorm_folds_in_eval(op_calls):
    original, fused = make_pair("timm_convnorm_dw")
    fused = nn.SyncBatchNorm.convert_sync_batchnorm(fused)
    assert isinstance(fused.bn, nn.SyncBatchNorm)
    original.eval(), fused.eval()
    x = torch.randn(2, 8, 5, 6)
    torch.testing.assert_close(fused(x), original(x), rtol=1e-5, atol=1e-5)
    assert len(op_calls) == 1
    assert isinstance(fused.restore().bn, nn.SyncBatchNorm)


@pytest.mark.parametrize("change", [
    lambda m: batchnorm(m).running_mean.add_(1),
    lambda m: batchnorm(m).running_var.mul_(3),
    lambda m: batchnorm(m).weight.mul_(-2),
    lambda m: batchnorm(m).bias.add_(1),
    lambda m: next(m.parameters()).mul_(2),  # the conv weight
])
@torch.no_grad()  # with gradients wanted the fold is recomputed anyway: test the cache
def test_module_refolds_after_in_place_change(change):
    original, fused = make_pair("sam_convlayer_gelu_bias")
    original.eval(), fused.eval()
    x = torch.randn(1, 6, 5, 5)
    before = fused(x)
    change(original), change(fused)
    after = fused(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, original(x), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_module_folds_once_until_a_source_changes(monkeypatch):
    folds = []
    monkeypatch.setattr(fold_module_file, "fold_bn_into", lambda *args: folds.append(1) or fold_bn_into(*args))
    _, fused = make_pair("timm_convnorm_s2")
    fused.eval()
    x = torch.randn(1, 6, 5, 5)
    fused(x), fused(x)
    assert len(folds) == 1
    fused.bn.running_mean.add_(1)
    fused(x), fused(x)
    assert len(folds) == 2


@torch.no_grad()  # with gradients wanted the fold is recomputed anyway: test the cache
def test_module_refolds_after_load_state_dict():
    original, fused = make_pair("timm_convnormact_geluTanh_depthwise")
    original.eval(), fused.eval()
    x = torch.randn(1, 8, 6, 6)
    before = fused(x)
    other = randomize_bn(ORIGINALS["timm_convnormact_geluTanh_depthwise"]()).eval()
    fused.load_state_dict(other.state_dict())
    after = fused(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, other(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["timm_convnormact_hardswish_s2", "cream_conv2d_bn", "sam_convlayer_gelu_bias"])
def test_module_eval_mode_gradients_reach_conv_and_bn(name):
    original, fused = make_pair(name)
    original.eval(), fused.eval()
    x = torch.randn(2, in_channels(original), 5, 5)
    fused(x)  # fills the fold cache: it must not stand in for the differentiable fold below
    for module in (original, fused):
        module(x).square().sum().backward()
    for (_, p_o), (_, p_f) in zip(original.named_parameters(), fused.named_parameters(), strict=True):
        assert p_f.grad is not None
        torch.testing.assert_close(p_f.grad, p_o.grad, rtol=1e-4, atol=1e-5)
    assert batchnorm(fused).weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_module_low_precision(dtype):
    original, fused = make_pair("timm_convnormact_geluTanh_depthwise")
    original.eval(), fused.eval().to(dtype)
    x = torch.randn(2, 8, 7, 5)
    out = fused(x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    expected = original(x)
    torch.testing.assert_close(out.float(), expected, rtol=3e-2, atol=3e-2 * expected.abs().max().item())


def test_module_cpu_autocast_bf16():
    original, fused = make_pair("timm_convnormact_hardswish_s2")
    original.eval(), fused.eval()
    x = torch.randn(2, 6, 7, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused(x)
    assert out.dtype == torch.bfloat16
    expected = original(x)
    torch.testing.assert_close(out.float(), expected, rtol=3e-2, atol=3e-2 * expected.abs().max().item())


def test_module_rejects_bad_input():
    _, fused = make_pair("cream_conv2d_bn")
    fused.eval()
    with pytest.raises(ValueError, match="channels"):
        fused(torch.randn(1, 5, 4, 4))
    with pytest.raises(ValueError, match="x must be"):
        fused(torch.randn(6, 4, 4))
    with pytest.raises(TypeError, match="dtype"):
        fused(torch.randn(1, 6, 4, 4, dtype=torch.float64))


@pytest.mark.parametrize("name", ORIGINALS)
def test_module_keeps_state_dict_and_restores(name):
    original = ORIGINALS[name]()
    keys = {k: v.shape for k, v in original.state_dict().items()}
    fused = FusedConvNormAct(original)
    assert {k: v.shape for k, v in fused.state_dict().items()} == keys
    assert fused.restore() is original


class ScaledGELU(nn.GELU):
    """A subclass of a known activation that computes something else."""

    def forward(self, x):
        return 2 * super().forward(x)


def with_act(act):
    original = ConvNormAct(6, 8, 3)
    original.act = act
    return original


@pytest.mark.parametrize("build, reason", [
    (lambda: ConvLayer(6, 8, 3, norm="ln2d"), "BatchNorm2d"),
    (lambda: with_act(nn.Tanh()), "activation"),
    (lambda: with_act(nn.LeakyReLU()), "activation"),
    (lambda: with_act(ScaledGELU()), "activation"),
    (lambda: nn.Sequential(), "nn.Conv2d"),
])
def test_module_unsupported_configurations(build, reason):
    with pytest.raises(Unsupported, match=reason):
        FusedConvNormAct(build())


@pytest.mark.parametrize("conv", [
    nn.Conv2d(4, 4, 3, padding="same"),
    nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
])
def test_module_unsupported_padding(conv):
    original = Conv2d_BN(4, 4)
    original.c = conv
    with pytest.raises(Unsupported, match="padding"):
        FusedConvNormAct(original)


def test_module_unsupported_extra_child():
    original = Conv2d_BN(4, 4)
    original.add_module("pool", nn.AvgPool2d(2))
    with pytest.raises(Unsupported, match="pool"):
        FusedConvNormAct(original)


@pytest.mark.parametrize("module, name", [
    (None, "none"), (nn.Identity(), "none"), (nn.ReLU(inplace=True), "relu"), (nn.ReLU6(), "relu6"),
    (nn.Hardswish(), "hardswish"), (nn.GELU(), "gelu"), (nn.GELU(approximate="tanh"), "gelu_tanh"),
    (GELUTanh(), "gelu_tanh"), (nn.SiLU(), "silu"),
])
def test_activation_name(module, name):
    assert activation_name(module) == name
    x = torch.randn(50) * 4
    expected = ACTIVATION_FORMULAS[name](x.double()).float()
    torch.testing.assert_close(expected, x if module is None else module(x.clone()))


# ---------------------------------------------------------------------------- the residual depthwise conv (M)

RESIDUAL_ORIGINALS = {
    "timm_residual_drop": lambda: ResidualDrop(ConvNorm(8, 8, 3, 1, 1, groups=8)),
    "cream_residual": lambda: Residual(Conv2d_BN(8, 8, 3, 1, 1, groups=8)),
}


@pytest.mark.parametrize("patch_child", [False, True], ids=["plain", "child_patched"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", RESIDUAL_ORIGINALS)
@torch.no_grad()
def test_residual_module_eval_adds_the_residual_in_the_op(name, backend, patch_child, op_calls):
    original = randomize_bn(RESIDUAL_ORIGINALS[name]()).eval()
    block = copy.deepcopy(original)
    if patch_child:  # what patch() does to m before or after wrapping it
        block.m = FusedConvNormAct(block.m)
    fused = FusedResidualConvNorm(block, backend=backend).eval()
    x = torch.randn(2, 8, 5, 7).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fused(x), original(x), rtol=1e-5, atol=1e-5)
    assert len(op_calls) == 1
    args, kwargs = op_calls[0]
    assert args[0] is x and kwargs["residual"] is x  # one call, the input itself as the residual
    assert fused.state_dict().keys() == original.state_dict().keys()


@pytest.mark.parametrize("drop", [0.0, 0.5])
def test_residual_module_training_matches_original(drop, op_calls):
    """Batch statistics (or an active drop): the original runs, the op never does."""
    original = randomize_bn(RESIDUAL_ORIGINALS["timm_residual_drop"]())
    original.drop = drop
    fused = FusedResidualConvNorm(copy.deepcopy(original))
    x = torch.randn(6, 8, 4, 3)
    outputs = []
    for module in (original, fused):
        torch.manual_seed(3)  # the same per-sample drop mask
        y = module(x)
        y.square().sum().backward()
        outputs.append(y)
    torch.testing.assert_close(outputs[1], outputs[0])
    assert_same_grads_and_buffers(original, fused)
    assert not op_calls


@pytest.mark.parametrize("build, reason", [
    (lambda: ResidualDrop(ConvNorm(8, 8, 3, 2, 1, groups=8)), "does not keep"),
    (lambda: ResidualDrop(ConvNorm(8, 16, 1)), "does not keep"),
    (lambda: ResidualDrop(ConvNorm(8, 8, 3, 1, 0, groups=8)), "does not keep"),
    (lambda: ResidualDrop(nn.Conv2d(8, 8, 3, padding=1)), "not a ConvNorm"),
    (lambda: Residual(nn.Sequential(Conv2d_BN(8, 8, 3, 1, 1, groups=8))), "not a ConvNorm"),
])
def test_residual_module_refuses_what_it_cannot_compute(build, reason):
    with pytest.raises(Unsupported, match=reason):
        FusedResidualConvNorm(build())


def test_patch_swaps_every_residual_depthwise_of_efficientvit_m0():
    model = randomize_bn(timm.create_model("efficientvit_m0", num_classes=10)).eval()
    patched = copy.deepcopy(model)
    report = evit_kernels.patch(patched)
    swapped = [m for m in patched.modules() if isinstance(m, FusedResidualConvNorm)]
    wrapped_convs = [m for m in model.modules() if type(m).__name__ == "ResidualDrop" and type(m.m) is ConvNorm]
    assert len(swapped) == report.counts()["timm.models.efficientvit_msra.ResidualDrop -> FusedResidualConvNorm"]
    # Each of M0's 6 blocks has dw0 and dw1; the downsamples' residual convs add 4 more.
    assert len(swapped) == len(wrapped_convs) == 16 and not report.skipped
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(patched(x), model(x), rtol=1e-4, atol=1e-4)
