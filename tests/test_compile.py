"""torch.compile(fullgraph=True) of patched models: one graph, same numbers."""

from __future__ import annotations

import copy

import pytest
import torch

import evit_kernels
from tests.models import build, rel_err

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["efficientvit_b0"])  # m0: test_compiled_kernels_are_graph_nodes, also fullgraph
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


def test_compiled_kernels_are_graph_nodes():
    """With the kernels chosen ("experimental": "auto" runs a kernel only where one measured faster on this GPU,
    and the reference as plain ops elsewhere), each fused op is one node of one graph, traced through its fake
    implementation, and the numbers stay.
    The rest of patched m0 (its convs on the reference path) is traced into the same single graph."""
    torch._dynamo.reset()
    model = build("efficientvit_m0")
    patched = copy.deepcopy(model)
    # the two ops counted below (the convs' kernels are tested elsewhere)
    evit_kernels.patch(patched, backend="ffn=experimental,cascaded_group_attention=experimental")
    nodes = []

    def backend(gm, example_inputs):
        nodes.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    compiled = torch.compile(patched, backend=backend, fullgraph=True)
    x = torch.randn(1, 3, 32, 32)  # the kernels run through the interpreter on CPU: the fewest pixels
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) < 1e-4
    assert nodes.count("evit.ffn") == 16, nodes  # one node per residual feed-forward block
    assert nodes.count("evit.cascaded_group_attention") == 6, nodes  # one per attention mixer (depths 1, 2, 3)
