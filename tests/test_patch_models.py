"""patch() on every real model: same outputs (eval), same loss/gradients/BN statistics (train), same
state_dict, exact unpatch, idempotence, low precision."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from torch import nn

import evit_kernels
from evit_kernels.nn._base import FusedModule
from tests.models import ALL, ATTENTION_CLASSES, assert_same_gradients, build, count_classes, input_sizes, rel_err

pytestmark = pytest.mark.slow


def _first(out):
    """The output to compare: the tensor itself, a list's first, a backbone dict's last stage."""
    if isinstance(out, dict):
        return list(out.values())[-1]
    return out if isinstance(out, torch.Tensor) else out[0]


@pytest.mark.parametrize("name", ALL)
def test_eval_matches_and_every_attention_module_is_swapped(name):
    model = build(name)
    patched = copy.deepcopy(model)
    report = evit_kernels.patch(patched)

    attention = count_classes(model, ATTENTION_CLASSES)
    assert attention > 0
    swapped_attention = sum(original.rsplit(".", 1)[-1] in ATTENTION_CLASSES for _, original, _ in report.swapped)
    assert swapped_attention == attention, str(report)
    assert count_classes(patched, ATTENTION_CLASSES) == 0, "an attention module was left unpatched"

    with torch.no_grad():
        for size in input_sizes(name):
            x = torch.randn(2, 3, *size)
            expected, got = _first(model(x)), _first(patched(x))
            assert got.shape == expected.shape and torch.isfinite(got).all()
            assert rel_err(got, expected) < 1e-4, (name, size)


TRAIN_MODELS = ["efficientvit_b0", "efficientvit_l1", "efficientvit_m0", "efficientvit-sam-l0", "cream"]


def _train_step(model: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = _first(model(x))
    (out * weight).sum().backward()
    return out.detach()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", TRAIN_MODELS)
def test_train_loss_gradients_and_running_stats_match(name, dtype):
    model = build(name).to(dtype).train()
    patched = copy.deepcopy(model)
    evit_kernels.patch(patched)
    x = torch.randn(2, 3, *input_sizes(name)[0], dtype=dtype)
    with torch.no_grad():
        weight = torch.randn_like(_first(model.eval()(x)))  # eval: the shape probe must not touch BN statistics
    model.train()
    # float64 runs agree to rounding, except that timm's LiteMLA computes its attention in fp32 even then.
    exact = dtype == torch.float64 and not name.startswith("efficientvit_b") and not name.startswith("efficientvit_l")
    assert rel_err(_train_step(patched, x, weight), _train_step(model, x, weight)) < (1e-10 if exact else 1e-4)

    assert_same_gradients({n: p.grad for n, p in patched.named_parameters() if p.grad is not None},
                          {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                          rtol=1e-8 if exact else 1e-4, floor=1e-6 if exact else 1e-2)
    expected_buffers = dict(model.named_buffers())
    for bname, b in patched.named_buffers():
        ref = expected_buffers[bname]
        assert torch.equal(b, ref) if not b.is_floating_point() else rel_err(b, ref) < (1e-10 if exact else 1e-5), bname


def test_optimizer_built_before_patch_trains_the_patched_model():
    model = build("efficientvit_b0").train()
    twin = copy.deepcopy(model)
    opt, opt_twin = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, twin))
    initial = model.stem.in_conv.conv.weight.detach().clone()
    evit_kernels.patch(model)
    x = torch.randn(2, 3, 64, 64)
    for m, o in ((model, opt), (twin, opt_twin)):
        m(x).square().mean().backward()
        o.step()
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), twin.named_parameters()):
        assert n1 == n2 and rel_err(p1, p2) < 1e-5, n1
    assert not torch.equal(model.stem.in_conv.conv.weight, initial)  # the optimizer did move the patched model


@pytest.mark.parametrize("name", ["efficientvit_b1", "efficientvit_m1", "efficientvit-sam-l0", "cream"])
def test_state_dict_unpatch_and_idempotence(name):
    model = build(name)
    before = [(n, m) for n, m in model.named_modules()]
    sd = model.state_dict()

    report = evit_kernels.patch(model)
    assert report.swapped
    patched_sd = model.state_dict()
    assert list(patched_sd) == list(sd)
    assert all(patched_sd[k].shape == sd[k].shape for k in sd)
    tree = [(n, id(m)) for n, m in model.named_modules()]
    assert not evit_kernels.patch(model).swapped, "patching twice must change nothing"
    assert [(n, id(m)) for n, m in model.named_modules()] == tree

    other = build(name)  # checkpoints load both ways
    other.load_state_dict(patched_sd)
    perturbed = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    model.load_state_dict(perturbed)
    assert torch.equal(model.state_dict()[next(iter(sd))], perturbed[next(iter(sd))])

    assert evit_kernels.unpatch(model) == len(report.swapped)
    assert [(n, id(m)) for n, m in model.named_modules()] == [(n, id(m)) for n, m in before]
    assert not any(isinstance(m, FusedModule) for m in model.modules())


@pytest.mark.parametrize("name", ["efficientvit_b0", "efficientvit_m0", "efficientvit-sam-l0"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_stays_finite(name, dtype):
    model = build(name)
    if name.startswith("efficientvit-sam") and dtype == torch.float16:
        # The LiteMLAs with eps 1e-15 are in the backbone. The whole encoder runs low precision only under
        # autocast (its neck upsamples in fp32), and CPU fp16 autocast of the neck's convs takes minutes.
        model = model.backbone
    patched = copy.deepcopy(model)
    evit_kernels.patch(patched)
    x = torch.randn(1, 3, *input_sizes(name)[0]) * 4
    with torch.no_grad():
        expected = _first(model(x))
        assert torch.isfinite(expected).all()
        if name.startswith("efficientvit-sam") and dtype == torch.bfloat16:
            with torch.autocast("cpu", dtype=dtype):
                got = _first(patched(x))
        else:
            got = _first(patched.to(dtype)(x.to(dtype)))
    assert torch.isfinite(got).all()
    assert rel_err(got.float(), expected) < (0.05 if dtype == torch.float16 else 0.1)


def test_unrecognised_configuration_is_left_alone_with_its_reason():
    from timm.models.efficientvit_mit import LiteMLA

    class LookAlike(nn.Module):  # same class name, defined elsewhere: never matched on the name alone
        pass

    LookAlike.__name__ = "LiteMLA"
    gelu_attention = LiteMLA(16, 16, dim=8)
    gelu_attention.kernel_func = nn.GELU()
    model = nn.Sequential(gelu_attention, LookAlike())
    report = evit_kernels.patch(model)
    assert type(model[0]) is LiteMLA and type(model[1]) is LookAlike
    reasons = dict(report.skipped)
    assert "kernel_func" in reasons["0"] or "ReLU" in reasons["0"], reasons
    assert "not the" in reasons["1"]
    assert "0.qkv" in {path for path, _, _ in report.swapped}  # its convs are still fused


def test_patch_refuses_a_module_it_would_swap_itself():
    from timm.models.efficientvit_mit import LiteMLA

    with pytest.raises(TypeError, match="patch the model containing it"):
        evit_kernels.patch(LiteMLA(16, 16, dim=8))


def test_fold_bn_is_destructive_but_exact():
    model = build("efficientvit_m0")
    expected_model = copy.deepcopy(model)
    folded = evit_kernels.fold_bn(model)
    assert folded > 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(model(x), expected_model(x)) < 1e-4
        evit_kernels.patch(model)
        assert rel_err(model(x), expected_model(x)) < 1e-4


def test_model_built_under_inference_mode():
    """Parameters created under inference mode have no version counter: folding must still track them."""
    with torch.inference_mode():
        model = build("efficientvit_m0")
        patched = copy.deepcopy(model)
        evit_kernels.patch(patched)
        x = torch.randn(1, 3, 64, 64)
        assert rel_err(patched(x), model(x)) < 1e-4
        before = patched(x)
        for m in [*model.modules(), *patched.modules()]:  # an in-place update must show up in the next call
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.add_(0.5)
        after, expected = patched(x), model(x)
    assert rel_err(after, expected) < 1e-4 and rel_err(after, before) > 1e-3


@pytest.mark.parametrize("name, fused_ops", [
    ("efficientvit_m0", {"cascaded_group_attention", "ffn", "conv_bn_act"}),
    ("efficientvit_b0", {"relu_linear_attention", "conv_block", "conv_bn_act"}),
])
def test_fold_bn_after_patch_keeps_every_fused_path(name, fused_ops, op_runs):
    """fold_bn replaces the BatchNorms of patched modules by nn.Identity: they must still run their fused ops,
    as many times as before."""
    model = build(name)
    patched = copy.deepcopy(model)
    evit_kernels.patch(patched)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        patched(x)
        before = Counter(op for op, _ in op_runs)
        evit_kernels.fold_bn(patched)
        op_runs.clear()
        assert rel_err(patched(x), model(x)) < 1e-4
    assert fused_ops <= set(before)
    assert Counter(op for op, _ in op_runs) == before


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", ["efficientvit_b0", "efficientvit_l1", "efficientvit_m0", "efficientvit-sam-l0"])
def test_meta_tensors_run_through_every_fused_module(name, mode):
    """Shape inference and deferred initialisation run models on meta tensors: a patched model must too. (Cream's
    own eval forward cannot: the bias table it caches stays on the CPU.)"""
    model = build(name)
    patched = copy.deepcopy(model)
    evit_kernels.patch(patched)
    x = torch.empty(2, 3, *input_sizes(name)[0], device="meta")
    outputs = [getattr(m, mode)().to("meta")(x) for m in (model, patched)]
    for expected, got in zip(*(torch.utils._pytree.tree_leaves(o) for o in outputs), strict=True):
        assert got.device.type == "meta" and got.shape == expected.shape and got.dtype == expected.dtype


@pytest.mark.parametrize("kind, where", [
    ("forward_hook", ""), ("forward_pre_hook", ""), ("full_backward_hook", ""), ("instance_forward", ""),
    ("forward_hook", "qkv.conv"), ("instance_forward", "qkv.conv"),  # inside: the fused module computes it
])
def test_modules_with_hooks_are_left_alone_and_reported(kind, where):
    """A hook (or an instance-level forward) on a module that patch would replace, or on a module inside it, must
    still run: that module is left as it was, with the reason, and the rest of the model is patched."""
    model = build("efficientvit_b0")
    attention = next(m for m in model.modules() if type(m).__name__ == "LiteMLA")
    target = attention.get_submodule(where)
    calls = []
    if kind == "instance_forward":
        plain = target.forward
        target.forward = lambda *args: calls.append(kind) or plain(*args)
    else:
        getattr(target, f"register_{kind}")(lambda *args: calls.append(kind))
    patched = copy.deepcopy(model)
    report = evit_kernels.patch(patched)
    reasons = [reason for _, reason in report.skipped if "which the fused module would not run" in reason]
    # the LiteMLA's ResidualBlock first (a hook inside it), then the LiteMLA (and qkv's ConvNormAct when inside it)
    assert reasons[0].startswith(f"ResidualBlock: main{'.' + where if where else ''} has "), report
    assert f"LiteMLA: {where or 'it'} has " in reasons[1], report
    assert sum(type(m).__name__ == "LiteMLA" for m in patched.modules()) == 1  # that one, unpatched
    assert any(isinstance(m, FusedModule) for m in patched.modules())  # the rest is patched
    x = torch.randn(1, 3, 32, 32, requires_grad=kind == "full_backward_hook")
    out = patched(x)
    out.sum().backward() if x.requires_grad else None
    assert calls, "the hook did not run"
    calls.clear()
    expected = model(x)
    assert rel_err(out, expected) < 1e-4
