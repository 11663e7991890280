"""patch() on diffusers' AutoencoderDC (DC-AE): every channel RMSNorm, SanaMultiscaleLinearAttention and GLUMBConv
swapped, the same outputs (eval) and gradients (train) as the untouched model, low precision within twice eager's
error, exact unpatch. "experimental" runs every op on its Triton kernel where it has one (the multi-scale
aggregation has none outside the fused inference op)."""

from __future__ import annotations

import copy

import pytest
import torch

import evit_kernels
from tests.models import assert_same_gradients, rel_err
from tests.numerics import max_err

pytest.importorskip("diffusers")

from tests.diffusers_models import autoencoder_dc  # noqa: E402

SIZE = (16, 12)  # one pixel-unshuffle stage: an 8×6 latent, non-square


SWAPPED = ("RMSNorm", "SanaMultiscaleLinearAttention", "GLUMBConv")


def _count(model, names=SWAPPED) -> int:
    return sum(type(m).__name__ in names for m in model.modules())


@pytest.mark.parametrize("backend", ["auto", "experimental"])
@pytest.mark.parametrize("norm", ["rms_norm", "batch_norm"])
def test_eval_matches_and_every_channel_norm_and_attention_is_swapped(norm, backend, op_runs):
    model = autoencoder_dc(norm)
    patched = copy.deepcopy(model)
    report = evit_kernels.patch(patched, backend=backend)
    assert _count(model) == len(report.swapped) and _count(patched) == 0, str(report)
    # one of each per EfficientViT block
    assert _count(model, ("SanaMultiscaleLinearAttention",)) == _count(model, ("GLUMBConv",)) == 2
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        expected, got = model(x).sample, patched(x).sample
    assert torch.isfinite(got).all() and rel_err(got, expected) < 1e-4
    ops = {op for op, _ in op_runs}
    attention = "relu_linear_attention" if backend == "auto" else "relu_linear_attention_aggregated"
    assert ops == {"rms_norm", "conv_block", attention} | ({"multiscale_aggregation"} if backend == "auto" else set()) \
        | ({"conv_bn_act"} if norm == "batch_norm" else set())  # the decoder attention's to_out + BatchNorm
    assert sum(op == "conv_block" for op, _ in op_runs) == 2
    assert {ran for _, ran in op_runs} == {"torch" if backend == "auto" else "triton"}


def test_multiscale_attention_quadratic_branch_and_refusals():
    """Maps of at most attention_head_dim pixels take diffusers' quadratic branch: the same function."""
    from diffusers.models.attention_processor import AttnProcessor2_0, SanaMultiscaleLinearAttention

    from evit_kernels.nn._base import Unsupported
    from evit_kernels.nn.lite_mla import FusedSanaMultiscaleLinearAttention

    attention = SanaMultiscaleLinearAttention(16, 16, attention_head_dim=8, norm_type="rms_norm", kernel_sizes=(3,),
                                              residual_connection=True)
    for p in attention.parameters():
        torch.nn.init.normal_(p, std=0.3)
    fused = FusedSanaMultiscaleLinearAttention(copy.deepcopy(attention))
    for size in ((2, 3), (5, 4)):  # 6 ≤ 8 pixels: quadratic; 20: linear
        x = torch.randn(2, 16, *size)
        with torch.no_grad():
            assert rel_err(fused(x), attention(x)) < 1e-5, size
    attention.processor = AttnProcessor2_0()
    with pytest.raises(Unsupported, match="SanaMultiscaleAttnProcessor2_0"):
        FusedSanaMultiscaleLinearAttention(attention)


@pytest.mark.parametrize("residual", [True, False])
def test_multiscale_attention_rms_norm_takes_the_residual_in_the_same_call(residual):
    """The output RMSNorm and the residual as one rms_norm call (and the norm module itself not called); the same
    numbers as the original, a second add only where the dtypes differ."""
    from diffusers.models.attention_processor import SanaMultiscaleLinearAttention

    attention = SanaMultiscaleLinearAttention(16, 16, attention_head_dim=8, norm_type="rms_norm", kernel_sizes=(3,),
                                              residual_connection=residual)
    for p in attention.parameters():
        torch.nn.init.normal_(p, std=0.3)
    _fused_in_one_call(attention, "rms_norm", ("norm_out",), residual)


def _fused_in_one_call(attention, op: str, skipped: tuple[str, ...], residual: bool, backend: str = "auto"):
    """The fused ``attention`` on a random map: the original's output, with ``op`` called once (taking the residual
    when the module has one) and the modules ``skipped`` not called. Returns the fused module and the map."""
    from evit_kernels import dispatch
    from evit_kernels.nn.lite_mla import FusedSanaMultiscaleLinearAttention

    fused = FusedSanaMultiscaleLinearAttention(copy.deepcopy(attention), backend=backend)
    hooks = [getattr(fused, name).register_forward_hook(lambda *_, name=name: pytest.fail(f"{name} was called"))
             for name in skipped]
    calls = []
    x = torch.randn(2, 16, 5, 4)
    with torch.no_grad(), dispatch.observing(lambda _backend, args: calls.append(args)):
        got = fused(x)
    assert rel_err(got, attention(x)) < 1e-5
    (call,) = [args for args in calls if args.op == op]
    assert (call.residual is not None) == residual
    for hook in hooks:
        hook.remove()
    return fused, x


def _batch_norm_attention(residual: bool = True):
    from diffusers.models.attention_processor import SanaMultiscaleLinearAttention

    from evit_kernels.diffusers_models import randomize

    return randomize(SanaMultiscaleLinearAttention(16, 16, attention_head_dim=8, norm_type="batch_norm",
                                                   kernel_sizes=(3,), residual_connection=residual))


@pytest.mark.parametrize("backend", ["auto", "experimental"])
@pytest.mark.parametrize("residual", [True, False])
def test_multiscale_attention_batch_norm_folds_into_to_out_with_the_residual(residual, backend):
    """A BatchNorm output norm on running statistics: to_out, the BatchNorm and the residual as one conv_bn_act
    call with the BatchNorm folded into to_out (neither module called); the original's numbers, and in fp16/bf16
    within twice eager's error."""
    attention = _batch_norm_attention(residual)
    fused, x = _fused_in_one_call(attention, "conv_bn_act", ("to_out", "norm_out"), residual, backend)
    with torch.no_grad():
        expected = copy.deepcopy(attention).double()(x.double())
        for dtype in (torch.float16, torch.bfloat16):
            eager, got = attention.to(dtype)(x.to(dtype)), fused.to(dtype)(x.to(dtype))
            assert got.dtype == dtype and torch.isfinite(got).all()
            floor = torch.finfo(dtype).eps * expected.abs().max().item()
            assert max_err(got, expected) <= 2 * max_err(eager, expected) + floor, dtype


def test_multiscale_attention_batch_norm_on_batch_statistics_or_an_adapted_to_out_runs_the_modules():
    """Training (batch statistics, running-stat updates) and a to_out that is not a plain nn.Linear (an adapter
    wraps it) keep the original's modules, in its order: the same outputs, gradients and running statistics."""
    from evit_kernels.nn.lite_mla import FusedSanaMultiscaleLinearAttention

    attention = _batch_norm_attention().train()
    fused = FusedSanaMultiscaleLinearAttention(copy.deepcopy(attention))
    x = torch.randn(2, 16, 5, 4)
    weights = torch.randn(2, 16, 5, 4)
    losses = [(m(x) * weights).sum() for m in (attention, fused)]
    for loss in losses:
        loss.backward()
    assert rel_err(losses[1].detach(), losses[0].detach()) < 1e-5
    assert_same_gradients({n: p.grad for n, p in fused.named_parameters()},
                          {n: p.grad for n, p in attention.named_parameters()})
    assert rel_err(fused.norm_out.running_var, attention.norm_out.running_var) < 1e-6

    class Adapted(torch.nn.Module):  # what an adapter library puts in the Linear's place
        def __init__(self, base):
            super().__init__()
            self.base, self.scale = base, 0.5

        def forward(self, t):
            return self.base(t) * self.scale

    attention.eval()
    attention.to_out = Adapted(attention.to_out)
    fused = FusedSanaMultiscaleLinearAttention(copy.deepcopy(attention))
    with torch.no_grad():
        assert rel_err(fused(x), attention(x)) < 1e-5


@pytest.mark.parametrize("backend", ["auto", "experimental"])
def test_train_loss_and_every_gradient_match(backend):
    model = autoencoder_dc().train()
    patched = copy.deepcopy(model)
    evit_kernels.patch(patched, backend=backend)
    x = torch.randn(2, 3, *SIZE)
    losses = [(m(x).sample * torch.linspace(-1, 1, 3 * SIZE[0] * SIZE[1]).reshape(1, 3, *SIZE)).sum()
              for m in (model, patched)]
    for loss in losses:
        loss.backward()
    assert rel_err(losses[1].detach(), losses[0].detach()) < 1e-4
    assert_same_gradients({n: p.grad for n, p in patched.named_parameters() if p.grad is not None},
                          {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    for (name, buf), ref in zip(patched.named_buffers(), model.buffers(), strict=True):  # the encoder's BatchNorms
        assert rel_err(buf, ref) < 1e-5 if buf.is_floating_point() else torch.equal(buf, ref), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["auto", "experimental"])
def test_low_precision_is_finite_and_within_twice_eager_error(backend, dtype):
    model = autoencoder_dc()
    patched = copy.deepcopy(model)
    evit_kernels.patch(patched, backend=backend)
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        expected = model.double()(x.double()).sample
        eager = model.to(dtype)(x.to(dtype)).sample
        got = patched.to(dtype)(x.to(dtype)).sample
    assert got.dtype == dtype and torch.isfinite(got).all()
    floor = torch.finfo(dtype).eps * expected.abs().max().item()
    assert max_err(got, expected) <= 2 * max_err(eager, expected) + floor


def test_state_dict_unpatch_and_idempotence():
    model = autoencoder_dc()
    before = [(n, id(m)) for n, m in model.named_modules()]
    sd = model.state_dict()
    report = evit_kernels.patch(model)
    assert list(model.state_dict()) == list(sd)
    assert all(model.state_dict()[k].shape == v.shape for k, v in sd.items())
    assert not evit_kernels.patch(model).swapped
    assert evit_kernels.unpatch(model) == len(report.swapped)
    assert [(n, id(m)) for n, m in model.named_modules()] == before
