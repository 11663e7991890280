"""Sana and its autoencoder at the released shapes: eager vs torch.compile vs patched (reference path) vs patched on
this package's kernels, inference, the configurations `python -m evit_kernels predict` names
(evit_kernels/diffusers_models.py).

On a GPU: bf16, batch 1, one Sana 600M transformer call at 1024 and 2048 px (32×32 and 64×64 latents), one Sana
1600M call at 1024 px, the DC-AE f32c32 decoder at 1024 and 2048 px. Not part of `benchmarks/gpu_pass.sh`: compiling
the transformers is expected to take minutes, beyond the pass's budget; run it on its own,
``python -m pytest -p no:cacheprovider benchmarks/bench_diffusers.py --benchmark-json diffusers.json``.
On CPU (with --benchmark-disable): fp32, the DC-AE decoder on a 1×1 latent (32 px), eager and patched on the
reference path, a smoke run of the code paths, marked slow (building the decoder takes a while on two cores). Not
the kernels: the Triton interpreter takes about two minutes per 1024-channel GLUMBConv even on a 1×1 map, over half
an hour for the decoder; tests/test_autoencoder_dc.py runs them on small AutoencoderDCs instead.
"""

from __future__ import annotations

import copy

import pytest
import torch

import evit_kernels
from evit_kernels.bench import build_model, input_shape

from .common import DEVICE, DTYPE, KERNELS, ON_GPU

pytest.importorskip("diffusers")

VARIANTS = ("eager", "compile", "patched", "kernels") if ON_GPU else ("eager", "patched")
if ON_GPU:
    CONFIGS = [("sana-600m", 1024), ("sana-600m", 2048), ("sana-1600m", 1024), ("dc-ae-f32c32-decode", 1024),
               ("dc-ae-f32c32-decode", 2048)]
else:
    CONFIGS = [("dc-ae-f32c32-decode", 32)]
    pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models():
    """One model per name, built once on the device (the largest has 1.6 billion parameters)."""
    built = {}

    def get(name):
        if name not in built:
            built.clear()  # one model on the device at a time
            built[name] = build_model(name, DEVICE).to(DEVICE, DTYPE)
        return built[name]

    return get


def _variant(model: torch.nn.Module, variant: str) -> torch.nn.Module:
    if variant in ("patched", "kernels"):
        model = copy.deepcopy(model)
        evit_kernels.patch(model, backend=KERNELS if variant == "kernels" else "auto")
    return torch.compile(model) if variant == "compile" else model


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name, res", CONFIGS)
def test_diffusers_inference(measure, models, name, res, variant):
    model = models(name)
    x = torch.randn(input_shape(name, 1, (res, res)), device=DEVICE, dtype=DTYPE)
    run = _variant(model, variant)
    with torch.inference_mode():
        expected = model(x)
        got = measure(lambda: run(x), rounds=10, warmup=3, model=name, batch=1, res=res, variant=variant, images=1)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.float(), expected.float(), rtol=0.05 if ON_GPU else 1e-4,
                                   atol=0.05 * expected.abs().max().item() if ON_GPU else 1e-4)
