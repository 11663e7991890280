"""torch.compile(fullgraph=True) of patched models: one graph, same numbers."""

from __future__ import annotations

import copy

import pytest
import torch

import evit_kernels
from tests.models import build, rel_err

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["efficientvit_b0", "efficientvit_m0"])
def test_compiled_patched_model_has_no_graph_break(name):
    torch._dynamo.reset()
    model = build(name)
    patched = copy.deepcopy(model)
    evit_kernels.patch(patched)
    compiled = torch.compile(patched, fullgraph=True)  # fullgraph: any graph break raises
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        assert rel_err(compiled(x), expected) < 1e-4
        assert rel_err(compiled(x + 0.5), model(x + 0.5)) < 1e-4  # cached fold + second call
