"""Whole models: eager vs torch.compile vs patched on this package's kernels, alone and under torch.compile,
inference.

On a GPU: bf16, 224 px, the models and batches the performance goals name, batch 256 first (a GPU window may end
before the last case; ``max-autotune`` and the reference-path ``patched`` variant are left to longer runs). On CPU
(CI, with --benchmark-disable): fp32, 32 px, batch 1, a smoke run of the same code paths.
"""

from __future__ import annotations

import copy

import pytest
import torch

import evit_kernels
from evit_kernels.bench import build_model

from .common import DEVICE, DTYPE, KERNELS, ON_GPU

RES = 224 if ON_GPU else 32  # on CPU the kernels run through the interpreter: the fewest pixels every stage takes
if ON_GPU:
    CASES = [(name, batch, variant)
             for batch in (256, 1)
             for name in ("efficientvit_b1", "efficientvit_l2", "efficientvit_m4")
             for variant in ("eager", "compile", "kernels", "kernels+compile")]
else:  # a smoke run of each code path; m0 on the kernels is tests/test_compile.py's (one interpreter run each)
    CASES = [("efficientvit_b0", 1, variant) for variant in ("eager", "patched", "kernels")] + \
            [("efficientvit_m0", 1, variant) for variant in ("eager", "patched")]


def _variant(model: torch.nn.Module, variant: str) -> torch.nn.Module:
    if variant.startswith(("patched", "kernels")):
        model = copy.deepcopy(model)
        evit_kernels.patch(model, backend=KERNELS if variant.startswith("kernels") else "auto")
    if variant.endswith("compile"):
        model = torch.compile(model)
    return model


@pytest.mark.parametrize("name, batch, variant", CASES)
def test_model_inference(measure, name, batch, variant):
    model = build_model(name).to(DEVICE, DTYPE)
    x = torch.randn(batch, 3, RES, RES, device=DEVICE, dtype=DTYPE)
    run = _variant(model, variant)
    with torch.inference_mode():
        expected = model(x)
        got = measure(lambda: run(x), model=name, batch=batch, res=RES, variant=variant, images=batch)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.float(), expected.float(), rtol=0.05 if ON_GPU else 1e-4,
                                   atol=0.05 * expected.abs().max().item() if ON_GPU else 1e-4)
