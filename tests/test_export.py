"""Whole patched models through the tracing export paths: the legacy ONNX exporter (the path to TensorRT and
onnxruntime) records the original modules, with the same parameters and numbers, never the fused path's shape
arithmetic baked into constants; timm's FX feature extraction keeps the fused modules whole. (torch.jit.trace and
torch.jit.script of each fused module type: tests/test_misuse.py.)"""

from __future__ import annotations

import copy
import io

import pytest
import torch

import evit_kernels
from evit_kernels.nn._base import FusedModule
from tests.models import build, rel_err

pytestmark = pytest.mark.slow

MODELS = ["efficientvit_b0", "efficientvit_m0"]


def _patched(name):
    model = build(name)
    patched = copy.deepcopy(model)
    evit_kernels.patch(patched)
    return model, patched


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_legacy_onnx_export_runs_right_in_onnxruntime(name):
    onnxruntime = pytest.importorskip("onnxruntime")
    model, patched = _patched(name)
    x, other = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)
    exported = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(patched, (x,), exported, dynamo=False)
        expected = model(other)
    assert any(isinstance(m, FusedModule) for m in patched.modules())  # exporting did not unpatch it
    session = onnxruntime.InferenceSession(exported.getvalue())
    got = session.run(None, {session.get_inputs()[0].name: other.numpy()})[0]
    assert rel_err(torch.from_numpy(got), expected) < 1e-4


@pytest.mark.parametrize("name", MODELS)
def test_timm_fx_feature_extraction_keeps_fused_modules_whole(name):
    """timm's FX feature extraction (features_only, create_feature_extractor) works on a patched model as on the
    original, with each fused module one leaf node that runs the fused path."""
    from timm.models._features_fx import create_feature_extractor

    model, patched = _patched(name)
    x = torch.randn(1, 3, 32, 32)
    nodes = {"stages.1": "features"}
    expected = create_feature_extractor(model, return_nodes=nodes)(x)["features"]
    extractor = create_feature_extractor(patched, return_nodes=nodes)
    leaves = [n.target for n in extractor.graph.nodes if n.op == "call_module"]
    assert any(isinstance(extractor.get_submodule(t), FusedModule) for t in leaves)
    assert rel_err(extractor(x)["features"], expected) < 1e-4
