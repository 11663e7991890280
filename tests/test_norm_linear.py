"""FusedNormLinear (BatchNorm1d → dropout → linear, folded in eval) against timm's NormLinear and Cream's
BN_Linear, and fold_bn_before_linear against a float64 formula."""

import copy

import pytest
import torch
import torch.nn.functional as F
from timm.models.efficientvit_msra import NormLinear
from torch import nn

from evit_kernels.nn._base import Unsupported
from evit_kernels.nn._fold import fold_bn_before_linear
from evit_kernels.nn.norm_linear import FusedNormLinear
from tests.cream_style import BN_Linear
from tests.models import randomize_bn
from tests.numerics import assert_same_grads_and_buffers

ORIGINALS = {
    "timm_normlinear": lambda: NormLinear(12, 7),
    "timm_normlinear_no_bias_dropout": lambda: NormLinear(12, 7, bias=False, drop=0.3),
    "cream_bn_linear": lambda: BN_Linear(12, 7),
    "cream_bn_linear_no_bias": lambda: BN_Linear(12, 7, bias=False),
}


def randomize(module):
    """A random BatchNorm and a random linear layer, bias included."""
    randomize_bn(module.bn)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, nn.Linear):
                layer.weight.normal_()
                if layer.bias is not None:
                    layer.bias.normal_()
    return module


def make_pair(name, **bn_options):
    """(original, fused) with identical, independent parameters."""
    original = ORIGINALS[name]()
    for key, value in bn_options.items():
        setattr(original.bn, key, value)
    randomize(original)
    return original, FusedNormLinear(copy.deepcopy(original))


def bn_calls(module):
    """Counts calls of ``module.bn`` from now on; none means the BatchNorm was folded."""
    calls = []
    module.bn.register_forward_hook(lambda *args: calls.append(1))
    return lambda: len(calls)


def linear_of(module):
    return next(m for m in module.modules() if isinstance(m, nn.Linear))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_fold_matches_float64_formula(bias, affine):
    bn = randomize_bn(nn.BatchNorm1d(5, eps=1e-3, affine=affine)).eval()
    weight, bias_t = torch.randn(3, 5), torch.randn(3) if bias else None
    folded_w, folded_b = fold_bn_before_linear(weight, bias_t, bn)
    x = torch.randn(4, 5, dtype=torch.float64)
    normalised = (x - bn.running_mean.double()) / torch.sqrt(bn.running_var.double() + bn.eps)
    if affine:
        normalised = normalised * bn.weight.double() + bn.bias.double()
    expected = normalised @ weight.double().T + (0 if bias_t is None else bias_t.double())
    torch.testing.assert_close(F.linear(x, folded_w.double(), folded_b.double()), expected, rtol=1e-5, atol=1e-5)


def test_fold_leaves_a_training_bn_alone():
    weight, bias = torch.randn(3, 5), torch.randn(3)
    assert fold_bn_before_linear(weight, bias, nn.BatchNorm1d(5).train()) == (weight, bias)
    assert fold_bn_before_linear(weight, None, None) == (weight, None)


@pytest.mark.parametrize("name", ORIGINALS)
def test_module_eval_matches_original(name):
    original, fused = make_pair(name)
    original.eval(), fused.eval()
    calls = bn_calls(fused)
    x = torch.randn(5, 12)
    torch.testing.assert_close(fused(x), original(x), rtol=1e-5, atol=1e-5)
    assert calls() == 0
    x1 = torch.randn(1, 24)[:, ::2]  # batch 1, non-contiguous
    torch.testing.assert_close(fused(x1), original(x1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("name", ORIGINALS)
def test_module_train_matches_original(name, momentum):
    original, fused = make_pair(name, momentum=momentum)
    original.train(), fused.train()
    for step in range(3):
        x, grad_out = torch.randn(6, 12), torch.randn(6, 7)
        outputs, x_grads = [], []
        for module in (original, fused):
            x_in = x.clone().requires_grad_()
            torch.manual_seed(step)  # the same dropout mask for both
            outputs.append(module(x_in))
            (outputs[-1] * grad_out).sum().backward()
            x_grads.append(x_in.grad)
        torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x_grads[1], x_grads[0], rtol=1e-5, atol=1e-5)
    assert_same_grads_and_buffers(original, fused)


@pytest.mark.parametrize("eps", [1e-7, 1e-3])
def test_module_uses_bn_eps(eps):
    original, fused = make_pair("cream_bn_linear", eps=eps)
    with torch.no_grad():
        original.bn.running_var.uniform_(1e-6, 1e-4)  # eps matters only next to a tiny variance
        fused.bn.running_var.copy_(original.bn.running_var)
    original.eval(), fused.eval()
    x = torch.randn(3, 12)
    torch.testing.assert_close(fused(x), original(x), rtol=1e-5, atol=1e-4)


@torch.no_grad()  # with gradients wanted the fold is recomputed anyway: test the cache
def test_module_refolds_when_eps_changes_after_a_forward():
    original, fused = make_pair("timm_normlinear")
    original.eval(), fused.eval()
    x = torch.randn(3, 12)
    before = fused(x)
    original.bn.eps = fused.bn.eps = 0.5
    after = fused(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, original(x), rtol=1e-5, atol=1e-5)


def test_module_bn_without_affine():
    original, fused = make_pair("timm_normlinear")
    original.bn = randomize_bn(nn.BatchNorm1d(12, affine=False))
    fused.bn = copy.deepcopy(original.bn)
    original.eval(), fused.eval()
    x = torch.randn(3, 12)
    torch.testing.assert_close(fused(x), original(x), rtol=1e-5, atol=1e-5)


def test_module_bn_without_running_stats_uses_batch_stats_in_eval():
    original, fused = make_pair("cream_bn_linear")
    original.bn = nn.BatchNorm1d(12, track_running_stats=False)
    fused.bn = copy.deepcopy(original.bn)
    original.eval(), fused.eval()
    calls = bn_calls(fused)
    x = torch.randn(4, 12) * 3 + 1
    torch.testing.assert_close(fused(x), original(x), rtol=1e-5, atol=1e-5)
    assert calls() == 1


def test_module_sync_batchnorm_in_eval():
    original, fused = make_pair("timm_normlinear")
    fused = nn.SyncBatchNorm.convert_sync_batchnorm(fused)
    assert isinstance(fused.bn, nn.SyncBatchNorm)
    original.eval(), fused.eval()
    x = torch.randn(3, 12)
    calls = bn_calls(fused)
    torch.testing.assert_close(fused(x), original(x), rtol=1e-5, atol=1e-5)
    assert calls() == 0


def test_module_dropout_left_in_train_mode_is_applied():
    original, fused = make_pair("timm_normlinear_no_bias_dropout")
    original.eval(), fused.eval()
    original.drop.train(), fused.drop.train()
    x = torch.randn(4, 12)
    torch.manual_seed(3)
    expected = original(x)
    torch.manual_seed(3)
    torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)


def test_module_3d_input_follows_the_original():
    # BatchNorm1d normalises dim 1 while the linear layer acts on the last dim: no fold applies.
    original, fused = make_pair("cream_bn_linear")
    original.eval(), fused.eval()
    x = torch.randn(2, 12, 12)
    torch.testing.assert_close(fused(x), original(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change", [
    lambda m: m.bn.running_mean.add_(1),
    lambda m: m.bn.running_var.mul_(3),
    lambda m: m.bn.weight.mul_(-2),
    lambda m: m.bn.bias.add_(1),
    lambda m: linear_of(m).weight.mul_(2),
    lambda m: linear_of(m).bias.add_(1),
])
@torch.no_grad()  # with gradients wanted the fold is recomputed anyway: test the cache
def test_module_refolds_after_in_place_change(change):
    original, fused = make_pair("cream_bn_linear")
    original.eval(), fused.eval()
    x = torch.randn(3, 12)
    before = fused(x)
    change(original), change(fused)
    after = fused(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, original(x), rtol=1e-5, atol=1e-5)


@torch.no_grad()  # with gradients wanted the fold is recomputed anyway: test the cache
def test_module_refolds_after_load_state_dict():
    original, fused = make_pair("timm_normlinear")
    original.eval(), fused.eval()
    x = torch.randn(3, 12)
    before = fused(x)
    other = randomize(NormLinear(12, 7)).eval()
    fused.load_state_dict(other.state_dict())
    after = fused(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, other(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["timm_normlinear", "cream_bn_linear"])
def test_module_eval_mode_gradients_reach_bn_and_linear(name):
    original, fused = make_pair(name)
    original.eval(), fused.eval()
    x = torch.randn(4, 12)
    fused(x)  # fills the fold cache: it must not stand in for the differentiable fold below
    for module in (original, fused):
        module(x).square().sum().backward()
    for (_, p_o), (_, p_f) in zip(original.named_parameters(), fused.named_parameters(), strict=True):
        assert p_f.grad is not None
        torch.testing.assert_close(p_f.grad, p_o.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_module_low_precision(dtype):
    original, fused = make_pair("timm_normlinear")
    original.eval(), fused.eval().to(dtype)
    x = torch.randn(4, 12)
    out = fused(x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    expected = original(x)
    torch.testing.assert_close(out.float(), expected, rtol=3e-2, atol=3e-2 * expected.abs().max().item())


def test_module_cpu_autocast_bf16():
    original, fused = make_pair("cream_bn_linear")
    original.eval(), fused.eval()
    x = torch.randn(4, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused(x)
    assert out.dtype == torch.bfloat16
    expected = original(x)
    torch.testing.assert_close(out.float(), expected, rtol=3e-2, atol=3e-2 * expected.abs().max().item())


def test_module_rejects_wrong_features_and_dtype():
    _, fused = make_pair("timm_normlinear")
    fused.eval()
    with pytest.raises(RuntimeError):
        fused(torch.randn(3, 11))
    with pytest.raises(RuntimeError, match="dtype|Double|Float"):
        fused(torch.randn(3, 12, dtype=torch.float64))


@pytest.mark.parametrize("name", ORIGINALS)
def test_module_keeps_state_dict_and_restores(name):
    original = ORIGINALS[name]()
    keys = {k: v.shape for k, v in original.state_dict().items()}
    fused = FusedNormLinear(original)
    assert {k: v.shape for k, v in fused.state_dict().items()} == keys
    assert fused.restore() is original


def replaced(child, module):
    original = BN_Linear(12, 7)
    setattr(original, child, module)
    return original


@pytest.mark.parametrize("build, reason", [
    (lambda: replaced("bn", nn.BatchNorm2d(12)), "BatchNorm1d"),
    (lambda: replaced("bn", nn.LayerNorm(12)), "BatchNorm1d"),
    (lambda: replaced("l", nn.Conv1d(12, 7, 1)), "nn.Linear"),
    (lambda: replaced("l", nn.Linear(10, 7)), "features"),
    (lambda: replaced("act", nn.ReLU()), "act"),
])
def test_module_unsupported_configurations(build, reason):
    with pytest.raises(Unsupported, match=reason):
        FusedNormLinear(build())
