"""evit::cascaded_group_attention and the fused CascadedGroupAttention / LocalWindowAttention modules, against
timm's efficientvit_msra modules (released M0–M5 configurations) and the Cream-style fixture."""

from __future__ import annotations

import copy
import functools

import pytest
import timm
import torch
from timm.models import efficientvit_msra as timm_msra
from torch import nn

from evit_kernels import dispatch
from evit_kernels.nn._base import Unsupported
from evit_kernels.nn.cascaded_group_attention import FusedCascadedGroupAttention, FusedLocalWindowAttention
from evit_kernels.ops.cascaded_group_attention import (
    attention_bias_index,
    cascaded_group_attention,
    window_merge,
    window_partition,
)
from tests import cream_style
from tests.models import randomize_bn

MODELS = [f"efficientvit_m{i}" for i in range(6)]
# Map sizes per stage (at 224 px the stages see 14×14, 7×7 and 4×4): the native size and one needing padding.
STAGE_MAPS = {0: [(14, 14), (9, 11)], 1: [(7, 7), (8, 8)], 2: [(4, 4), (2, 3)]}
CGA_TYPES = (timm_msra.CascadedGroupAttention, cream_style.CascadedGroupAttention)
LWA_TYPES = (timm_msra.LocalWindowAttention, cream_style.LocalWindowAttention)


@functools.cache
def _released_mixers(name: str) -> tuple[nn.Module, ...]:
    model = timm.create_model(name, pretrained=False)
    return tuple(stage.blocks[0].mixer.m for stage in model.stages)


def released_mixer(name: str, stage: int) -> nn.Module:
    """A fresh copy of the first LocalWindowAttention of ``stage`` in timm model ``name``, randomised."""
    return randomise(copy.deepcopy(_released_mixers(name)[stage]))


def randomise(module: nn.Module) -> nn.Module:
    """Non-trivial BN statistics, BN affine and position biases (defaults would hide folding/bias bugs)."""
    randomize_bn(module)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, CGA_TYPES):
                m.attention_biases.normal_()
    return module


def fuse(lwa: nn.Module) -> FusedLocalWindowAttention:
    fused = FusedLocalWindowAttention(lwa)
    fused.attn = FusedCascadedGroupAttention(fused.attn)
    return fused


def fold64(block: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv + BN folded in float64 by the textbook formula, independent of evit_kernels' folding."""
    conv = block.conv if hasattr(block, "conv") else block.c
    bn = block.bn
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    return conv.weight.double() * scale[:, None, None, None], bn.bias.double() - bn.running_mean.double() * scale


def op_args(attn: nn.Module) -> tuple:
    qkv = [fold64(b) for b in attn.qkvs]
    dw = [fold64(b) for b in attn.dws]
    proj_w, proj_b = fold64(attn.proj[1])
    window = attn.attention_bias_idxs.shape[0] ** 0.5
    return ([w for w, _ in qkv], [b for _, b in qkv], [w for w, _ in dw], [b for _, b in dw],
            attn.attention_biases.detach().double(), proj_w, proj_b, attn.key_dim, int(window))


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.isfinite(actual).all()
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= tol * max(scale, 1e-6), f"max error {err} vs max |expected| {scale}"


def tiny_op_inputs(dtype=torch.float64, requires_grad=False, map_hw=(4, 5)):
    """2 heads, key_dim 2, value dim 2, kernels 3 and 1, window 3 (so a 4×5 map is padded to 6×6)."""
    def t(*shape):
        return torch.randn(*shape, dtype=dtype, requires_grad=requires_grad)

    x = t(2, 4, *map_hw)
    return (x, [t(6, 2, 1, 1), t(6, 2, 1, 1)], [t(6), t(6)], [t(2, 1, 3, 3), t(2, 1, 1, 1)], [t(2), t(2)],
            t(2, 9), t(5, 4, 1, 1), t(5), 2, 3)


# --- shared pieces -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("resolution", [1, 4, 7])
def test_bias_index_matches_timm_and_cream(resolution):
    expected = attention_bias_index(resolution)
    timm_cga = timm_msra.CascadedGroupAttention(8, 4, 2, resolution=resolution)
    cream_cga = cream_style.CascadedGroupAttention(8, 4, 2, resolution=resolution)
    assert torch.equal(timm_cga.attention_bias_idxs, expected)
    assert torch.equal(cream_cga.attention_bias_idxs, expected)


@pytest.mark.parametrize("hw,window", [((9, 11), 7), ((7, 7), 7), ((2, 3), 4), ((1, 1), 1), ((8, 5), 4)])
def test_window_partition_round_trip_and_zero_padding(hw, window):
    x = torch.randn(2, 3, *hw)
    windows, meta = window_partition(x, window)
    H, W = hw
    pH, pW = -(-H // window) * window, -(-W // window) * window
    assert windows.shape == (2 * (pH // window) * (pW // window), 3, window, window)
    padded = torch.zeros(2, 3, pH, pW)
    padded[:, :, :H, :W] = x
    # First window of the second image holds the top-left block of the zero-padded map.
    per_image = windows.shape[0] // 2
    assert torch.equal(windows[per_image], padded[1, :, :window, :window])
    assert torch.equal(window_merge(windows, meta), x)


# --- the op against the original timm modules ----------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_op_matches_timm_released_configs_float64(name):
    for stage, maps in STAGE_MAPS.items():
        lwa = released_mixer(name, stage).double().eval()
        args = op_args(lwa.attn)
        for hw in maps:
            x = torch.randn(2, lwa.dim, *hw, dtype=torch.float64)
            with torch.no_grad():
                expected = lwa(x)
            assert_rel_close(cascaded_group_attention(x, *args), expected, 1e-12)


@pytest.mark.parametrize("hw", [(5, 5), (1, 1), (4, 9)])
def test_op_matches_timm_small_window_padding_float64(hw):
    lwa = released_mixer("efficientvit_m1", 2).double().eval()  # window 4: 5×5 → 8×8, 1×1 → 4×4
    x = torch.randn(1, lwa.dim, *hw, dtype=torch.float64)
    with torch.no_grad():
        expected = lwa(x)
    assert_rel_close(cascaded_group_attention(x, *op_args(lwa.attn)), expected, 1e-12)


def test_op_channels_last_and_non_contiguous_inputs():
    x, *rest = tiny_op_inputs(map_hw=(5, 4))
    expected = cascaded_group_attention(x, *rest)
    assert expected.is_contiguous()
    assert_rel_close(cascaded_group_attention(x.to(memory_format=torch.channels_last), *rest), expected, 1e-14)
    transposed = x.transpose(2, 3).contiguous().transpose(2, 3)
    assert not transposed.is_contiguous()
    assert_rel_close(cascaded_group_attention(transposed, *rest), expected, 1e-14)


# The dynamic-shape AOT check recompiles the recomputing backward (~8 s): run it in one dtype only.
@pytest.mark.parametrize("dtype,test_utils", [
    (torch.float64, ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")),
    (torch.float32, ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static"))])
def test_opcheck(dtype, test_utils):
    args = tiny_op_inputs(dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.evit.cascaded_group_attention.default, (*args, "torch"), test_utils=test_utils)


def test_gradcheck_float64():
    args = tiny_op_inputs(torch.float64, requires_grad=True, map_hw=(3, 4))
    tensors, spec = torch.utils._pytree.tree_flatten(list(args[:8]))

    def fn(*flat):
        # Through the library op, so that its registered backward (not PyTorch's own autograd) is what is checked.
        return torch.ops.evit.cascaded_group_attention(*torch.utils._pytree.tree_unflatten(list(flat), spec),
                                                       *args[8:], "torch")

    assert torch.autograd.gradcheck(fn, tensors)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_is_finite_and_close(dtype):
    lwa = released_mixer("efficientvit_m2", 0).eval()
    args = op_args(lwa.attn)
    x = torch.randn(1, lwa.dim, 9, 11, dtype=torch.float64)
    expected = cascaded_group_attention(x, *args)
    low = torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.to(dtype), (x, *args))
    out = cascaded_group_attention(*low)
    assert out.dtype == dtype
    assert_rel_close(out.double(), expected, 5e-2)
    with torch.no_grad():
        module_out = fuse(lwa).to(dtype).eval()(x.to(dtype))
    assert module_out.dtype == dtype
    assert_rel_close(module_out.double(), expected, 5e-2)


def test_autocast_runs_in_autocast_dtype():
    x, *rest = tiny_op_inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cascaded_group_attention(x, *rest)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_clear_errors():
    x, qkv_w, qkv_b, dw_w, dw_b, biases, proj_w, proj_b, kd, window = tiny_op_inputs(torch.float32)
    good = (qkv_w, qkv_b, dw_w, dw_b, biases, proj_w, proj_b, kd, window)
    with pytest.raises(ValueError, match="B, C, H, W"):
        cascaded_group_attention(x[0], *good)
    with pytest.raises(ValueError, match="must match"):
        cascaded_group_attention(torch.randn(2, 6, 4, 5), *good)
    with pytest.raises(ValueError, match="qkv_weights"):
        cascaded_group_attention(torch.randn(2, 4, 4, 5), [qkv_w[0], torch.randn(6, 3, 1, 1)], *good[1:])
    with pytest.raises(ValueError, match="one entry per head"):
        cascaded_group_attention(x, qkv_w, qkv_b[:1], *good[2:])
    with pytest.raises(ValueError, match="attention_biases"):
        cascaded_group_attention(x, *good[:-1], 4)
    with pytest.raises(ValueError, match="dw_weights"):
        cascaded_group_attention(x, qkv_w, qkv_b, [dw_w[0], torch.randn(2, 1, 2, 2)], *good[3:])
    with pytest.raises(TypeError, match="dtype"):
        cascaded_group_attention(x.double(), *good)


def test_explicit_request_for_an_unusable_backend_raises():
    with pytest.raises(dispatch.BackendUnavailable, match="backend 'cuda' was requested"):
        cascaded_group_attention(*tiny_op_inputs(torch.float32), backend="cuda")


# --- the modules ---------------------------------------------------------------------------------------------

def _compare_train(original: nn.Module, fused: nn.Module, x: torch.Tensor, tol: float = 1e-5) -> None:
    """Output, gradients of x and of every parameter, and BN running stats after one train step."""
    original.train()
    fused.train()
    weight = torch.randn_like(original(x.detach()))  # one warm-up step moves the running stats of both
    fused(x.detach())
    results = []
    for module in (original, fused):
        xi = x.detach().clone().requires_grad_()
        out = module(xi)
        (out * weight).sum().backward()
        results.append((out, xi.grad, dict(module.named_parameters()), dict(module.named_buffers())))
    (out_a, gx_a, params_a, bufs_a), (out_b, gx_b, params_b, bufs_b) = results
    assert_rel_close(out_b, out_a, tol)
    assert_rel_close(gx_b, gx_a, tol)
    assert params_a.keys() == params_b.keys() and bufs_a.keys() == bufs_b.keys()
    for key, param in params_a.items():
        assert_rel_close(params_b[key].grad, param.grad, tol)
    for key, buf in bufs_a.items():
        if buf.is_floating_point():
            assert_rel_close(bufs_b[key], buf, tol)
        else:
            assert torch.equal(bufs_b[key], buf)


@pytest.mark.parametrize("name,stage,hw", [("efficientvit_m0", 0, (9, 11)), ("efficientvit_m1", 1, (7, 7)),
                                           ("efficientvit_m2", 2, (2, 3)), ("efficientvit_m3", 0, (14, 14)),
                                           ("efficientvit_m4", 2, (4, 4)), ("efficientvit_m5", 1, (8, 8))])
def test_timm_module_eval_and_train(name, stage, hw, op_runs):
    original = released_mixer(name, stage)
    fused = fuse(copy.deepcopy(original))
    x = torch.randn(2, original.dim, *hw)
    with torch.no_grad():
        assert_rel_close(fused.eval()(x), original.eval()(x), 1e-5)
    assert op_runs[0] == ("cascaded_group_attention", "torch")  # the folded whole-map op, not the original
    _compare_train(original, fused, x)


def test_timm_module_eval_gradients():
    original = released_mixer("efficientvit_m1", 0).eval()
    fused = fuse(copy.deepcopy(original)).eval()
    x = torch.randn(2, original.dim, 9, 8)
    grads = []
    for module in (original, fused):
        xi = x.clone().requires_grad_()
        module(xi).square().sum().backward()
        grads.append([xi.grad] + [p.grad for _, p in module.named_parameters()])
    for got, want in zip(grads[1], grads[0], strict=True):
        assert_rel_close(got, want, 1e-4)


def test_local_window_attention_with_unpatched_attn():
    original = released_mixer("efficientvit_m4", 0).eval()
    fused = FusedLocalWindowAttention(copy.deepcopy(original)).eval()
    assert not isinstance(fused.attn, FusedCascadedGroupAttention)
    x = torch.randn(1, original.dim, 9, 11)
    with torch.no_grad():
        assert_rel_close(fused(x), original(x), 1e-6)


def test_cascaded_group_attention_module_on_window_batch():
    original = released_mixer("efficientvit_m2", 1).attn
    fused = FusedCascadedGroupAttention(copy.deepcopy(original))
    x = torch.randn(3, original.num_heads * original.qkvs[0].conv.in_channels, 7, 7)
    original.eval()  # timm's train() returns None
    with torch.no_grad():
        assert_rel_close(fused.eval()(x), original(x), 1e-5)
    _compare_train(original, fused, x)
    with pytest.raises(ValueError, match="window batch"):
        fused(torch.randn(1, x.shape[1], 9, 9))


def test_state_dict_keys_unchanged():
    for original in (released_mixer("efficientvit_m0", 0), cream_style.LocalWindowAttention(32, 16, 2, 1, 8, 7)):
        fused = fuse(copy.deepcopy(original))
        want = {k: v.shape for k, v in original.state_dict().items()}
        assert {k: v.shape for k, v in fused.state_dict().items()} == want
    assert "attn.attention_bias_idxs" in want  # Cream's index is persistent, timm's is not


def test_fold_cache_refolds_on_in_place_change(op_runs):
    original = released_mixer("efficientvit_m0", 1).eval()
    fused = fuse(copy.deepcopy(original)).eval()
    x = torch.randn(1, original.dim, 7, 7)
    with torch.no_grad():
        before = fused(x)
        fused.attn.qkvs[1].bn.running_mean.add_(1)
        original.attn.qkvs[1].bn.running_mean.add_(1)
        after = fused(x)
        assert not torch.allclose(before, after)
        assert_rel_close(after, original(x), 1e-5)
        fused.attn.attention_biases.add_(0.5)
        original.attn.attention_biases.add_(0.5)
        original.eval()  # timm caches the gathered biases in eval; train()/eval() clears that cache
        assert_rel_close(fused(x), original(x), 1e-5)
    assert [op for op, _ in op_runs].count("cascaded_group_attention") == 3


def test_unsupported_configurations():
    base = released_mixer("efficientvit_m0", 2)
    bad_index = copy.deepcopy(base.attn)
    bad_index.attention_bias_idxs[0, 1], bad_index.attention_bias_idxs[0, 2] = 2, 1
    with pytest.raises(Unsupported, match="offset index"):
        FusedCascadedGroupAttention(bad_index)
    strided = copy.deepcopy(base.attn)
    strided.dws[0].conv.stride = (2, 2)
    with pytest.raises(Unsupported, match="dws"):
        FusedCascadedGroupAttention(strided)
    plain_conv = copy.deepcopy(base.attn)
    plain_conv.qkvs[0] = nn.Conv2d(16, 64, 1)
    with pytest.raises(Unsupported, match="not a ConvNorm / Conv2d_BN"):
        FusedCascadedGroupAttention(plain_conv)
    with pytest.raises(Unsupported, match="cascaded group attention"):
        FusedCascadedGroupAttention(nn.Conv2d(4, 4, 1))


# --- Cream-style modules -------------------------------------------------------------------------------------

@pytest.mark.parametrize("resolution,window,heads,kernels", [(8, 7, 2, (7, 5)), (4, 7, 3, (5, 3, 3)),
                                                             (7, 7, 2, (3, 3)), (9, 4, 2, (5, 5))])
def test_cream_module_eval_and_train(resolution, window, heads, kernels):
    dim = 16 * heads
    original = randomise(cream_style.LocalWindowAttention(dim, 16, heads, 1, resolution, window, kernels))
    fused = fuse(copy.deepcopy(original))
    x = torch.randn(2, dim, resolution, resolution)
    with torch.no_grad():
        assert_rel_close(fused.eval()(x), original.eval()(x), 1e-5)
        assert_rel_close(FusedLocalWindowAttention(copy.deepcopy(original)).eval()(x), original(x), 1e-5)
    _compare_train(original, fused, x)


def test_cream_module_never_reads_stale_cached_biases():
    original = randomise(cream_style.LocalWindowAttention(32, 16, 2, 1, 4, 7, (5, 3))).eval()
    fused = fuse(copy.deepcopy(original)).eval()
    x = torch.randn(1, 32, 4, 4)
    with torch.no_grad():
        change = torch.randn_like(original.attn.attention_biases)  # a uniform shift would cancel in the softmax
        for module in (original, fused):
            module.attn.attention_biases.add_(change)
        stale = original(x)  # Cream reads `ab`, gathered when eval() was called
        original.eval()
        fresh = original(x)
        assert not torch.allclose(stale, fresh)
        assert_rel_close(fused(x), fresh, 1e-5)


def test_cream_window_condition_and_size_check():
    # Cream runs the map unsplit when it fits one window and refuses any other size; timm would pad instead.
    original = randomise(cream_style.LocalWindowAttention(32, 16, 2, 1, 4, 7, (5, 3))).eval()
    fused = fuse(copy.deepcopy(original)).eval()
    for module in (original, fused):
        with pytest.raises(AssertionError):
            module(torch.randn(1, 32, 3, 4))


def _fuse_model(model: nn.Module) -> nn.Module:
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, LWA_TYPES):
                setattr(parent, name, fuse(child))
    return model


def test_cream_model_fused_matches_original():
    original = randomise(cream_style.build_cream_model())
    fused = _fuse_model(copy.deepcopy(original))
    assert sum(isinstance(m, FusedCascadedGroupAttention) for m in fused.modules()) == 2
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        assert_rel_close(fused.eval()(x), original.eval()(x), 1e-5)
    _compare_train(original, fused, x, tol=1e-4)
