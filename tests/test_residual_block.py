"""FusedResidualBlock: the MIT family's ResidualBlock around a LiteMLA or a two-conv block (timm ConvBlock,
mit-han-lab ResBlock) with an identity shortcut, the shortcut added in the last layer's conv_bn_act call: the
original's output in eval (every backend), in training (gradients) and under autocast (its dtype), every
state_dict key kept, exact unpatch, clear refusals."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

import evit_kernels
from evit_kernels import dispatch
from evit_kernels.nn.residual_block import FusedResidualBlock
from tests.models import assert_same_gradients, build, randomize_bn, rel_err


@functools.cache
def _model(name: str) -> nn.Module:
    return build(name)


def _residual_block(name: str, main_class: str) -> nn.Module:
    """A fresh copy of the first ResidualBlock of model ``name`` with an identity shortcut around a ``main_class``."""
    block = next(m for m in _model(name).modules() if type(m).__name__ == "ResidualBlock"
                 and type(m.main).__name__ == main_class and m.shortcut is not None)
    return randomize_bn(copy.deepcopy(block)).eval()


def _channels(block: nn.Module) -> int:
    return next(m for m in block.modules() if isinstance(m, nn.Conv2d)).in_channels


BLOCKS = [("efficientvit_l1", "ConvBlock"), ("efficientvit_b0", "LiteMLA"), ("efficientvit-sam-l0", "ResBlock"),
          ("efficientvit-sam-l0", "LiteMLA")]
"""timm's L-series stem block and EfficientViT context module; mit-han-lab's (efficientsam) the same."""


# experimental: the Triton kernels (through the interpreter on this CPU; SAM's wide LiteMLA only on torch: minutes)
@pytest.mark.parametrize("name, main_class, backend", [*((*block, "torch") for block in BLOCKS),
                                                       *((*block, "experimental") for block in BLOCKS[:3])])
def test_eval_adds_the_shortcut_in_the_last_conv_call(name, main_class, backend):
    original = _residual_block(name, main_class)
    holder = nn.Sequential(copy.deepcopy(original))
    report = evit_kernels.patch(holder, backend=backend)
    assert isinstance(holder[0], FusedResidualBlock), str(report)
    assert holder.state_dict().keys() == nn.Sequential(original).state_dict().keys()
    x = torch.randn(2, _channels(original), 9, 7)
    calls = []
    with torch.no_grad(), dispatch.observing(lambda chosen, args: calls.append((args, chosen.name))):
        expected = copy.deepcopy(original).double()(x.double())
        got = holder(x)
    assert got.shape == expected.shape and rel_err(got, expected) < 1e-5
    last, last_backend = calls[-1]
    assert last.op == "conv_bn_act" and last.residual is x, "the shortcut is not the last conv's residual"
    assert last_backend == ("torch" if backend == "torch" else "triton")


@pytest.mark.parametrize("name, main_class", BLOCKS)
def test_training_matches_the_original_with_its_gradients(name, main_class):
    """fp32: LiteMLA computes its attention in fp32 whatever the model's dtype."""
    original = _residual_block(name, main_class).train()
    patched = nn.Sequential(copy.deepcopy(original))
    evit_kernels.patch(patched)
    x = torch.randn(4, _channels(original), 8, 8)
    expected, got = original(x), patched(x)
    assert rel_err(got, expected) < 1e-5
    weight = torch.randn_like(expected)
    (expected * weight).sum().backward()
    (got * weight).sum().backward()
    assert_same_gradients({n: p.grad for n, p in patched[0].named_parameters()},
                          {n: p.grad for n, p in original.named_parameters()})


@pytest.mark.parametrize("name, main_class", BLOCKS[:2])
def test_autocast_keeps_the_originals_dtype(name, main_class):
    """Under autocast an fp32 shortcut added to the bf16 branch gives fp32, as the original's add: the shortcut
    enters the last conv's call as it is (fp32, not cast), which returns the fp32 sum."""
    original = _residual_block(name, main_class)
    patched = nn.Sequential(copy.deepcopy(original))
    evit_kernels.patch(patched)
    x = torch.randn(2, _channels(original), 8, 8)
    calls = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = original(x)
        with dispatch.observing(lambda chosen, args: calls.append(args)):
            got = patched(x)
    assert got.dtype == expected.dtype == torch.float32
    assert rel_err(got, expected) < 2e-2
    assert calls[-1].op == "conv_bn_act" and calls[-1].residual is x and calls[-1].x.dtype == torch.bfloat16


def test_unpatch_restores_the_original():
    original = _residual_block("efficientvit_b0", "LiteMLA")
    holder = nn.Sequential(original)
    evit_kernels.patch(holder)
    assert isinstance(holder[0], FusedResidualBlock)
    evit_kernels.unpatch(holder)
    assert holder[0] is original


def _without_shortcut(block):
    block.shortcut = None
    return block


def _strided(block):
    block.main.conv1.conv.stride = (2, 2)
    return block


@pytest.mark.parametrize("change, reason", [(_without_shortcut, "no shortcut"),
                                            (_strided, "keeps the channels and the resolution")])
def test_a_block_it_cannot_fuse_is_left_with_its_reason(change, reason):
    holder = nn.Sequential(change(_residual_block("efficientvit_l1", "ConvBlock")))
    report = evit_kernels.patch(holder)
    assert not isinstance(holder[0], FusedResidualBlock)
    assert any(reason in why for _, why in report.skipped), str(report)
