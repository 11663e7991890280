"""GLUMBConv: evit::conv_block in GLU mode (its reference written out, the per-layer path, gradients, misuse; the
kernel's cases against float64 and opcheck are "glumbconv_*" in tests/test_conv_block.py) and FusedGLUMBConv
against diffusers' and mit-han-lab's GLUMBConv in eval and training, with the refusals of what it cannot
compute."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from efficientsam.models.nn import ops as mit_han_lab
from torch import nn

import evit_kernels
from evit_kernels import predict
from evit_kernels.bench import randomize_untrained_state
from evit_kernels.nn import glumbconv as fused_module_file
from evit_kernels.nn._base import Unsupported
from evit_kernels.nn.glumbconv import FusedGLUMBConv
from evit_kernels.ops.conv_block import conv_block
from tests.models import assert_same_gradients, rel_err
from tests.numerics import in_layout
from tests.test_conv_block import CASES as BLOCK_CASES
from tests.test_conv_block import _double, _inputs

GLUMBConv = pytest.importorskip("diffusers.models.transformers.sana_transformer").GLUMBConv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _tokens_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` as SanaTransformerBlock hands it to its GLUMBConv: token-major (B, H·W, C) data viewed as (B, C, H, W)."""
    batch, channels, height, width = t.shape
    tokens = t.permute(0, 2, 3, 1).reshape(batch, height * width, channels).contiguous()
    return tokens.unflatten(1, (height, width)).permute(0, 3, 1, 2)


def test_sanas_view_is_the_channels_last_layout_of_the_op_cases():
    """The op's GLU cases (tests/test_conv_block.py, "glumbconv_*": with and without a projection, stride 2, every
    dtype against float64) read channels-last maps: the strides of Sana's permuted token view."""
    t = torch.randn(2, 16, 6, 5)
    view = _tokens_view(t)
    assert not view.is_contiguous() and view.stride() == in_layout(t, "channels_last").stride()
    assert any(case.gate and case.layout == "channels_last" for case in BLOCK_CASES.values())


def test_reference_is_glumbconv_written_out():
    """The op's reference against the block written out with torch.nn.functional, in float64."""
    args, kwargs = _double(*_inputs(BLOCK_CASES["glumbconv_residual"], torch.float32))
    x, w1, b1, w2, b2, w3, b3 = args
    h = F.conv2d(F.silu(F.conv2d(x, w1, b1)), w2, b2, padding=1, groups=w2.shape[0])
    value, gate = h.chunk(2, dim=1)
    expected = F.conv2d(value * F.silu(gate), w3, b3) + kwargs["residual"]
    torch.testing.assert_close(conv_block(*args, **kwargs, backend="torch"), expected, rtol=1e-12, atol=1e-12)


def test_a_gate_after_another_spatial_conv_runs_layer_by_layer(poisoned_empty):
    """A gated block runs layer by layer, with or without an expand: conv_bn_act's kernels, the depthwise one
    applying the gate."""
    args, kwargs = _inputs(BLOCK_CASES["glumbconv_residual"], torch.float32)
    x, _, _, _, _, w3, b3 = args
    channels = x.shape[1]
    args = (x, None, None, torch.randn(channels, 1, 3, 3, device=DEVICE), torch.randn(channels, device=DEVICE),
            torch.randn(w3.shape[0], channels // 2, 1, 1, device=DEVICE), b3)
    with predict.recorded_launches() as launches:
        conv_block(*(None if t is None else t.to("meta") for t in args),
                   **{**kwargs, "residual": kwargs["residual"].to("meta")}, backend="triton")
    assert [launch.kernel for launch in launches] == ["_conv_dw_kernel", "_conv_dense_kernel"]
    expected = conv_block(*_double(args, kwargs)[0], **_double(args, kwargs)[1], backend="torch")
    torch.testing.assert_close(conv_block(*args, **kwargs, backend="triton").double(), expected, rtol=1e-5,
                               atol=1e-5)


def test_gradients_through_the_reference_after_a_triton_forward():
    args, kwargs = _inputs(BLOCK_CASES["glumbconv_wide_projection_residual"], torch.float32)
    leaves = [t.clone().requires_grad_() for t in (*args, kwargs["residual"])]
    exact = [t.detach().double().requires_grad_() for t in leaves]
    weight = torch.randn(conv_block(*args, **kwargs, backend="torch").shape, dtype=torch.float64, device=DEVICE)
    (conv_block(*leaves[:-1], **{**kwargs, "residual": leaves[-1]}, backend="triton") * weight).sum().backward()
    x, w1, b1, w2, b2, w3, b3, r = exact
    h = F.conv2d(F.silu(F.conv2d(x, w1, b1)), w2, b2, padding=1, groups=w2.shape[0])
    value, gate = h.chunk(2, dim=1)
    ((F.conv2d(value * F.silu(gate), w3, b3) + r) * weight).sum().backward()
    for got, ref in zip(leaves, exact, strict=True):
        torch.testing.assert_close(got.grad.double(), ref.grad, rtol=1e-4, atol=1e-4)


def test_misuse_raises_clearly():
    args, kwargs = _inputs(BLOCK_CASES["glumbconv_sana_channels_last"], torch.float32)
    x, w1, b1, w2, b2, w3, b3 = args
    with pytest.raises(ValueError, match="w3 must be"):  # the projection takes the gated half, not all of d
        conv_block(x, w1, b1, w2, b2, torch.randn(16, w2.shape[0], 1, 1, device=DEVICE), b3, **kwargs)
    with pytest.raises(ValueError, match="two halves"):
        conv_block(x, w1[:-1], b1[:-1], w2[:-1], b2[:-1], w3, b3, **kwargs)
    with pytest.raises(ValueError, match="unknown activation"):
        conv_block(*args, **{**kwargs, "gate": "sigmoid"})
    with pytest.raises(ValueError, match="x must be"):
        conv_block(x[0], *args[1:], **kwargs)
    with pytest.raises(TypeError, match="w3 has dtype"):
        conv_block(x, w1, b1, w2, b2, w3.half(), b3, **kwargs)
    with pytest.raises(ValueError, match="on meta"):
        conv_block(x, w1, b1, w2, b2, w3.to("meta"), b3, **kwargs)


# --- the drop-in module ------------------------------------------------------------------------------------------


def _diffusers(norm_type=None, residual=False, channels=16):
    return GLUMBConv(channels, channels, expand_ratio=2.5, norm_type=norm_type, residual_connection=residual)


def _mit_han_lab(norm=(None, None, "bn2d"), act=("silu", "silu", None)):
    return mit_han_lab.GLUMBConv(16, 16, expand_ratio=2.5, use_bias=(True, True, False), norm=norm, act_func=act)


BUILDERS = {
    "sana_ff": _diffusers,
    "dc_ae_rms_norm_residual": lambda: _diffusers("rms_norm", True),
    "rms_norm_only": lambda: _diffusers("rms_norm", False),
    "residual_only": lambda: _diffusers(None, True),
    "mit_han_lab_bn": _mit_han_lab,
    "mit_han_lab_bn_everywhere": lambda: _mit_han_lab(("bn2d", "bn2d", "bn2d"), ("relu6", "gelu", "relu")),
}
LAYOUTS = {"contiguous": lambda x: x, "tokens": _tokens_view, "channels_last": lambda x: in_layout(x, "channels_last")}


def _built(name):
    module = BUILDERS[name]().to(DEVICE)
    randomize_untrained_state(module)
    with torch.no_grad():
        for p in module.parameters():  # diffusers' RMSNorm starts at weight 1, bias 0: hide nothing
            p.add_(0.1 * torch.randn_like(p))
    return module.eval()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("name", BUILDERS)
@torch.no_grad()
def test_module_matches_original_in_eval(name, backend, layout, op_runs):
    original = _built(name)
    fused = FusedGLUMBConv(copy.deepcopy(original), backend=backend)
    x = LAYOUTS[layout](torch.randn(2, 16, 6, 5, device=DEVICE))
    expected, got = original(x), fused(x)
    assert got.shape == expected.shape and rel_err(got, expected) < 1e-4
    ran = "torch" if backend == "auto" else "triton"
    norm = name in ("dc_ae_rms_norm_residual", "rms_norm_only")
    assert op_runs == [("conv_block", ran)] + ([("rms_norm", ran)] if norm else [])
    assert fused.state_dict().keys() == original.state_dict().keys()


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("name", BUILDERS)
def test_module_gradients_match_in_training(name, backend, op_runs):
    """Every parameter's gradient and the input's: diffusers' (no BatchNorm) through the op, whose gradient is its
    reference's; mit-han-lab's BatchNorms on batch statistics through the original layers (running stats too)."""
    original = _built(name).train()
    fused = FusedGLUMBConv(copy.deepcopy(original), backend=backend).train()
    x = torch.randn(3, 16, 5, 7, device=DEVICE)
    weight = torch.randn(3, 16, 5, 7, device=DEVICE)
    grads = []
    for module in (original, fused):
        module.zero_grad()
        leaf = x.clone().requires_grad_()
        (module(leaf) * weight).sum().backward()
        grads.append({"x": leaf.grad, **{n: p.grad for n, p in module.named_parameters()}})
    assert_same_gradients(grads[1], grads[0])
    for (n, got), ref in zip(fused.named_buffers(), original.buffers(), strict=True):
        torch.testing.assert_close(got, ref, msg=n)
    has_batch_norm = name.startswith("mit_han_lab")
    assert bool(op_runs) != has_batch_norm


def test_eval_mode_fine_tuning_gradients_reach_the_folded_batch_norms():
    original = _built("mit_han_lab_bn_everywhere")
    fused = FusedGLUMBConv(copy.deepcopy(original))
    x = torch.randn(2, 16, 6, 5, device=DEVICE)
    grads = []
    for module in (original, fused):
        (module(x) ** 2).sum().backward()
        grads.append({n: p.grad for n, p in module.named_parameters()})
    assert_same_gradients(grads[1], grads[0])


@pytest.mark.parametrize("name", ["sana_ff", "dc_ae_rms_norm_residual"])
def test_under_autocast_the_output_dtype_is_the_originals(name):
    original = _built(name)
    fused = FusedGLUMBConv(copy.deepcopy(original))
    x = torch.randn(2, 16, 6, 5, device=DEVICE)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        expected, got = original(x), fused(x)
    assert got.dtype == expected.dtype and rel_err(got, expected) < 2e-2


def test_an_adapter_on_a_conv_runs_the_original_forward(monkeypatch):
    """A LoRA wrapped around a conv after patching: the op would skip it, so the original's forward runs."""
    peft = pytest.importorskip("peft")
    original = nn.Sequential(_built("dc_ae_rms_norm_residual"))
    model = copy.deepcopy(original)
    assert evit_kernels.patch(model).counts()
    config = peft.LoraConfig(r=2, init_lora_weights=False, target_modules=["conv_inverted"])
    for m in (original, model):
        torch.manual_seed(1)
        peft.inject_adapter_in_model(config, m)
    monkeypatch.setattr(fused_module_file, "conv_block", lambda *args, **kwargs: pytest.fail("op called"))
    x = torch.randn(2, 16, 6, 5, device=DEVICE)
    with torch.no_grad():
        assert rel_err(model(x), original(x)) < 1e-6


def test_patch_swaps_the_glumbconv_of_a_mit_han_lab_efficientvit_block(op_runs):
    block = mit_han_lab.EfficientViTBlock(16, dim=8, expand_ratio=4, local_module="GLUMBConv").to(DEVICE)
    randomize_untrained_state(block)
    block.eval()
    model = nn.Sequential(copy.deepcopy(block))
    report = evit_kernels.patch(model, backend="experimental")
    assert isinstance(model[0].local_module.main, FusedGLUMBConv), str(report)
    x = torch.randn(1, 16, 7, 6, device=DEVICE)
    with torch.no_grad():
        assert rel_err(model(x), block(x)) < 1e-4
    assert ("conv_block", "triton") in op_runs
    assert evit_kernels.unpatch(model) == len(report.swapped)
    assert type(model[0].local_module.main) is mit_han_lab.GLUMBConv


@pytest.mark.parametrize("build, reason", [
    (lambda: _mit_han_lab(norm=(None, None, "ln2d")), "point_conv's norm LayerNorm2d is not a BatchNorm2d"),
    (lambda: _with(_mit_han_lab(), "glu_act", nn.Sigmoid()), "Sigmoid"),
    (lambda: _mit_han_lab(act=("silu", None, None)), "glu_act is None"),
    (lambda: _with(_diffusers(), "nonlinearity", nn.Tanh()), "Tanh"),
    (lambda: _with(_diffusers("rms_norm"), "norm", nn.LayerNorm(16)), "not diffusers' RMSNorm"),
    (lambda: _with(_diffusers(), "conv_depth", nn.Conv2d(80, 80, 3, padding=1, groups=40)), "groups 40"),
    (lambda: _with(_diffusers(), "conv_depth", nn.Conv2d(80, 80, 3, padding=1, groups=80, padding_mode="reflect")),
     "zero-padded"),
    (lambda: _with(_diffusers(), "extra", nn.ReLU()), "children"),
])
def test_refuses_what_it_cannot_compute(build, reason):
    with pytest.raises(Unsupported, match=reason):
        FusedGLUMBConv(build())


def _with(module, name, child):
    setattr(module, name, child)
    return module
