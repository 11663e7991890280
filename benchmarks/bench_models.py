"""Whole models: eager vs torch.compile vs patched on this package's kernels, alone and under torch.compile,
inference; at batch 1 also eager and the kernels captured in a CUDA graph (the batch-1 latency goal's setting:
without one, batch 1 times the host's Python and launches more than the GPU).

On a GPU: bf16, 224 px, the models and batches the performance goals name, the compiles last (a GPU window may end
before the last case; ``max-autotune`` and the reference-path ``patched`` variant are left to longer runs). On CPU
(CI, with --benchmark-disable): fp32, 32 px, batch 1, a smoke run of the same code paths but the CUDA graphs.
"""

from __future__ import annotations

import copy

import pytest
import torch

import evit_kernels
from evit_kernels.bench import build_model, in_cuda_graph

from .common import DEVICE, DTYPE, KERNELS, ON_GPU

RES = 224 if ON_GPU else 32  # on CPU the kernels run through the interpreter: the fewest pixels every stage takes
if ON_GPU:
    # Cheapest first, as a GPU window may end before the last case: the compiles (tens of seconds each) come last.
    MODELS = ("efficientvit_b1", "efficientvit_l2", "efficientvit_m4")
    ROUNDS = [(256, ("eager", "kernels")), (1, ("eager", "eager+graph", "kernels", "kernels+graph")),
              (256, ("compile", "kernels+compile")), (1, ("compile", "kernels+compile"))]
    CASES = [(name, batch, variant) for batch, variants in ROUNDS for name in MODELS for variant in variants]
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
    run = _variant(model, variant.removesuffix("+graph"))
    with torch.inference_mode():
        expected = model(x)
        call = in_cuda_graph(lambda: run(x)) if variant.endswith("+graph") else lambda: run(x)
        got = measure(call, model=name, batch=batch, res=RES, variant=variant, images=batch)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.float(), expected.float(), rtol=0.05 if ON_GPU else 1e-4,
                                   atol=0.05 * expected.abs().max().item() if ON_GPU else 1e-4)
