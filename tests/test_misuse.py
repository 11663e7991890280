"""A systematic guard against silently wrong results: every fused module type, taken from patched real models,
through the ways users run modules besides a plain forward (meta tensors, deepcopy and pickle, jit.trace,
jit.script, hooks registered after patch). Each must give the original's result (or its shapes, on meta)."""

from __future__ import annotations

import copy
import functools
import pickle

import pytest
import torch
from torch import nn

import evit_kernels
from evit_kernels.nn._base import FusedModule
from tests.models import build, rel_err

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")]

TYPES = ["FusedConvNormAct", "FusedResidualConvNorm", "FusedConvBlock", "FusedLiteMLA", "FusedResidualFFN",
         "FusedLocalWindowAttention", "FusedCascadedGroupAttention", "FusedNormLinear", "FusedPatchEmbedding",
         "FusedPatchMerging", "FusedResidualBlock"]


@functools.cache
def _samples() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """One (fused module, an input it was called with) per fused module type, from patched b0 and m0 in eval
    mode with randomised BatchNorm."""
    samples = {}
    for name in ("efficientvit_b0", "efficientvit_m0"):
        patched = build(name)
        evit_kernels.patch(patched)

        def record(module, args):
            samples.setdefault(type(module).__name__, (module, args[0].detach().clone()))

        handles = [m.register_forward_pre_hook(record) for m in patched.modules() if isinstance(m, FusedModule)]
        with torch.no_grad():
            patched(torch.randn(2, 3, 64, 64))
            if "FusedLocalWindowAttention" in samples:  # its fused path calls the CGA's forward_map, not the module:
                window, x = samples["FusedLocalWindowAttention"]  # its original calls the (fused) CGA on windows
                window.restore()(x)
        for handle in handles:
            handle.remove()
    assert sorted(samples) == sorted(TYPES)
    return samples


def _fused_and_original(kind: str) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """A copy of the sampled fused module, an unpatched copy of its original, and the input."""
    module, x = _samples()[kind]
    fused = copy.deepcopy(module)
    holder = nn.Sequential(copy.deepcopy(module))
    evit_kernels.unpatch(holder)
    assert not any(isinstance(m, FusedModule) for m in holder.modules())
    return fused, holder[0], x


@pytest.mark.parametrize("kind", TYPES)
@torch.no_grad()
def test_meta_tensors(kind):
    fused, original, x = _fused_and_original(kind)
    out = fused.to("meta")(x.to("meta"))
    assert out.device.type == "meta" and out.shape == original(x).shape


@pytest.mark.parametrize("kind", TYPES)
@torch.no_grad()
def test_deepcopy_and_pickle(kind):
    fused, original, x = _fused_and_original(kind)
    expected = original(x)
    for clone in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        assert type(clone) is type(fused)
        assert rel_err(clone(x), expected) < 1e-4


@pytest.mark.parametrize("kind", TYPES)
@torch.no_grad()
def test_jit_trace_on_other_inputs_and_jit_script(kind):
    fused, original, x = _fused_and_original(kind)
    other = torch.randn_like(x)
    traced = torch.jit.trace(copy.deepcopy(fused), x)
    assert rel_err(traced(other), original(other)) < 1e-4  # nothing of x baked in
    scripted = torch.jit.script(copy.deepcopy(fused))
    assert rel_err(scripted(other), original(other)) < 1e-4


@pytest.mark.parametrize("kind", TYPES)
@torch.no_grad()
def test_hooks_registered_after_patch_run(kind):
    fused, original, x = _fused_and_original(kind)
    seen = []
    fused.register_forward_pre_hook(lambda module, args: seen.append("pre"))
    fused.register_forward_hook(lambda module, args, out: out * 2)
    assert rel_err(fused(x), 2 * original(x)) < 1e-4 and seen == ["pre"]
