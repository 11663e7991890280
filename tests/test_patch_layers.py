"""FusedPatchEmbedding and FusedPatchMerging: EfficientViT-M's stem and downsampling block (timm and Cream-style)
with their activations in the conv epilogues: the same outputs as the original in eval (on every backend), the
original's own forward in training, every state_dict key kept, exact unpatch."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

import evit_kernels
from evit_kernels.nn.patch_layers import FusedPatchEmbedding, FusedPatchMerging
from tests.cream_style import PatchMerging as CreamPatchMerging
from tests.models import randomize_bn, rel_err


def _timm_m0():
    return timm.create_model("efficientvit_m0", pretrained=False)


def _timm_patch_embedding():
    return randomize_bn(_timm_m0().patch_embed), 3


def _timm_patch_merging():
    return randomize_bn(_timm_m0().stages[1].downsample.patchmerge), 64


def _cream_patch_merging():
    return randomize_bn(CreamPatchMerging(16, 24)), 16


def _patch_merging_with_3x3_conv1():
    """conv1 made a 3×3 conv: not an expand, so conv1 and conv2 run as two conv_bn_act calls."""
    merging, in_channels = _timm_patch_merging()
    conv = merging.conv1.conv
    merging.conv1.conv = torch.nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1, bias=False)
    return merging, in_channels


MERGING_CALLS = ["conv_block", "conv_bn_act"]
"""conv1 → act → conv2 → act as one conv_block without a projection, then conv3."""


@pytest.mark.parametrize("build, fused_class, calls", [
    (_timm_patch_embedding, FusedPatchEmbedding, ["conv_bn_act"] * 4),
    (_timm_patch_merging, FusedPatchMerging, MERGING_CALLS),
    (_cream_patch_merging, FusedPatchMerging, MERGING_CALLS),
    (_patch_merging_with_3x3_conv1, FusedPatchMerging, ["conv_bn_act"] * 3),
])
# experimental: the kernels where they take the layer (every conv of these blocks)
@pytest.mark.parametrize("backend", ["torch", "experimental"])
def test_eval_matches_with_activations_in_the_conv_epilogues(build, fused_class, calls, backend, op_runs):
    original, in_channels = build()
    holder = torch.nn.Sequential(copy.deepcopy(original.eval()))
    report = evit_kernels.patch(holder, backend=backend)
    assert isinstance(holder[0], fused_class), str(report)
    assert holder.state_dict().keys() == torch.nn.Sequential(original).state_dict().keys()
    x = torch.randn(2, in_channels, 19, 13)
    with torch.no_grad():
        expected = copy.deepcopy(original).double()(x.double())
        got = holder(x)
    assert got.shape == expected.shape and rel_err(got, expected) < 1e-5
    assert [op for op, _ in op_runs] == calls
    backends = {b for _, b in op_runs}
    assert backends == {"torch"} if backend == "torch" else "triton" in backends
    if backend == "experimental":  # the expand and depthwise layer by layer on conv_bn_act's kernels
        assert all(b == "triton" for op, b in op_runs if op == "conv_block")


@pytest.mark.parametrize("build", [_timm_patch_embedding, _timm_patch_merging])
def test_training_runs_the_original_and_unpatch_restores_it(build):
    original, in_channels = build()
    original.train()
    holder = torch.nn.Sequential(copy.deepcopy(original))
    evit_kernels.patch(holder)
    x = torch.randn(4, in_channels, 16, 16)
    torch.testing.assert_close(holder(x), original(x), rtol=0, atol=0)
    evit_kernels.unpatch(holder)
    assert type(holder[0]) is type(original)


def test_each_conv_is_checked():
    original, _ = _timm_patch_merging()
    original.conv2 = torch.nn.Conv2d(256, 256, 3)
    report = evit_kernels.patch(torch.nn.Sequential(original))
    assert not any(replacement == "FusedPatchMerging" for _, _, replacement in report.swapped)
    assert any("conv2" in reason for _, reason in report.skipped), str(report)
