"""How patch() recognises modules (each fused class's MATCHES) and hands its backend request to what it swaps in."""

from __future__ import annotations

import pytest
import timm
import torch
from efficientsam.models.nn.ops import ConvLayer
from timm.models.efficientvit_msra import ConvNorm, ResidualDrop
from torch import nn

import evit_kernels
from evit_kernels.nn._base import FusedModule
from evit_kernels.nn._match import Match
from evit_kernels.nn.conv_bn_act import FusedConvNormAct
from tests.models import randomize_bn


def test_patch_gives_its_backend_to_every_module_it_swaps_in():
    model = timm.create_model("efficientvit_m0", num_classes=10)
    report = evit_kernels.patch(model, backend="triton")
    fused = [m for m in model.modules() if isinstance(m, FusedModule)]
    assert len(fused) == len(report.swapped) > 0
    assert {m.backend for m in fused} == {"triton"}


@pytest.mark.parametrize("request_, error", [
    ("trition", ValueError), ("conv_bn_act=nope", ValueError), ("conv_bn_act", ValueError), (3, TypeError),
])
def test_bad_backend_request_raises_before_anything_is_swapped(request_, error):
    model = timm.create_model("efficientvit_m0", num_classes=10)
    before = [(name, id(m)) for name, m in model.named_modules()]
    with pytest.raises(error):
        evit_kernels.patch(model, backend=request_)
    assert [(name, id(m)) for name, m in model.named_modules()] == before
    with pytest.raises(error):  # also where there is nothing to swap
        evit_kernels.patch(nn.Sequential(nn.ReLU()), backend=request_)


class ConvMlp(nn.Module):
    """timm's ConvMlp by class name and attributes, defined elsewhere and computing something else."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.pw1 = ConvNorm(channels, hidden)
        self.act = nn.ReLU()
        self.pw2 = ConvNorm(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * self.pw2(self.act(self.pw1(x)))


def test_a_child_is_matched_by_its_defining_module_not_by_its_class_name():
    """A timm ResidualDrop around a look-alike ConvMlp is no feed-forward block: a rule matching the child by its
    class name alone would swap in FusedResidualFFN, which computes timm's ConvMlp instead."""
    model = randomize_bn(nn.Sequential(ResidualDrop(ConvMlp(8, 16)))).eval()
    x = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        expected = model(x)
        report = evit_kernels.patch(model)
        got = model(x)
    assert type(model[0]) is ResidualDrop
    assert dict(report.skipped) == {"0": f"ResidualDrop.m: ConvMlp from {__name__} is not the timm class"}
    assert isinstance(model[0].m.pw1, FusedConvNormAct)  # timm's own ConvNorms inside it are still swapped
    torch.testing.assert_close(got, expected)


def test_fold_bn_after_patch_skips_a_conv_layer_without_norm():
    """mit-han-lab's ConvLayer(norm=None) keeps ``norm`` as a plain attribute, which the fused module does not
    adopt: fold_bn folds the others and leaves it."""
    model = randomize_bn(nn.Sequential(ConvLayer(4, 4, 3, norm=None), ConvLayer(4, 4, 3))).eval()
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        expected = model(x)
        evit_kernels.patch(model)
        assert evit_kernels.fold_bn(model) == 1
        torch.testing.assert_close(model(x), expected)


def test_a_match_names_only_children_among_its_attributes():
    with pytest.raises(ValueError, match="among its attributes"):
        Match("timm", "ResidualDrop", ("timm.models.efficientvit_msra",), ("drop",), children=(("m", ()),))
