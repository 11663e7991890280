"""patch() on diffusers' AutoencoderDC (DC-AE): every channel RMSNorm swapped, the same outputs (eval) and gradients
(train) as the untouched model, low precision within twice eager's error, exact unpatch."""

from __future__ import annotations

import copy

import pytest
import torch

import evit_kernels
from tests.models import assert_same_gradients, rel_err
from tests.numerics import max_err

pytest.importorskip("diffusers")

from tests.diffusers_models import autoencoder_dc  # noqa: E402

SIZE = (16, 12)  # two pixel-unshuffle stages: a 4×3 latent, non-square


def _rms_norms(model) -> int:
    return sum(type(m).__name__ == "RMSNorm" for m in model.modules())


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("norm", ["rms_norm", "batch_norm"])
def test_eval_matches_and_every_rms_norm_is_swapped(norm, backend, op_runs):
    model = autoencoder_dc(norm)
    patched = copy.deepcopy(model)
    report = evit_kernels.patch(patched, backend=backend)
    assert _rms_norms(model) == len(report.swapped) > 0 and _rms_norms(patched) == 0, str(report)
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        expected, got = model(x).sample, patched(x).sample
    assert torch.isfinite(got).all() and rel_err(got, expected) < 1e-4
    assert {run for run in op_runs} == {("rms_norm", "torch" if backend == "auto" else "triton")}


@pytest.mark.parametrize("backend", ["auto", "triton"])
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
@pytest.mark.parametrize("backend", ["auto", "triton"])
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
