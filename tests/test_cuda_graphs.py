"""Patched models in a CUDA graph (on a GPU): captured once with the kernels chosen, every replay computes what the
unpatched model does for the input copied into the captured one; nothing a kernel launches happens outside the
stream the capture records, and nothing it allocates outlives the capture's pool. The batch-1 latency goal is
measured this way (benchmarks/bench_models.py, the "+graph" variants)."""

from __future__ import annotations

import copy

import pytest
import torch

import evit_kernels
from evit_kernels import dispatch
from evit_kernels.bench import in_cuda_graph
from tests.models import build, rel_err

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", ["efficientvit_b0", "efficientvit_m0"])
def test_patched_model_replays_in_a_cuda_graph(name):
    model = build(name).to("cuda", torch.bfloat16)
    patched = copy.deepcopy(model)
    evit_kernels.patch(patched, backend="experimental")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 3, 224, 224, device="cuda", dtype=torch.bfloat16, generator=g)
    with torch.inference_mode():
        replay = in_cuda_graph(lambda: patched(x))
        with dispatch.recording() as runs:
            replay()  # the warm-up calls and the capture
        assert any(backend != "torch" for _, backend in runs), runs
        outputs = []
        for scale in (1.0, 3.0):  # new inputs, copied into the captured one
            x.copy_(torch.randn(x.shape, device="cuda", dtype=x.dtype, generator=g) * scale)
            got = replay().clone()
            assert rel_err(got, patched(x)) < 1e-2  # the same kernels launched from the host
            assert rel_err(got, model(x)) < 0.05  # bf16 through the whole model, as benchmarks/bench_models.py
            outputs.append(got)
        assert rel_err(outputs[0], outputs[1]) > 0.1  # the second replay computed the second input's output
