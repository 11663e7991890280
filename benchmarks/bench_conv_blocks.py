"""Conv + BatchNorm + activation blocks at real EfficientViT shapes, inference: eager (BatchNorm unfolded and
folded) vs torch.compile (max-autotune) vs patched (reference and Triton per-layer kernels).

``min_bytes`` is the traffic of a whole-block fused kernel (read the input once, write the output once; the
expanded tensor never leaves the chip), the floor that block fusion aims at.
"""

from __future__ import annotations

import copy

import pytest
import torch
from timm.models import efficientvit_mit as mit
from timm.models import efficientvit_msra as msra

import evit_kernels
from evit_kernels.bench import randomize_untrained_state
from evit_kernels.nn.conv_bn_act import FusedConvNormAct

from .common import DEVICE, DTYPE, ON_GPU


def _blocks(tiny: bool) -> dict:
    """name -> (factory, channels, side): B1 stage-3 MBConv and stem DSConv, L1 stage-2 FusedMBConv, M4 stage-1
    FFN (224 px); tiny maps on CPU."""
    gelu = mit.GELUTanh if hasattr(mit, "GELUTanh") else torch.nn.GELU
    blocks = {
        "b1_mbconv_s3": (lambda c: mit.MBConv(c, c, expand_ratio=4, use_bias=(True, True, False),
                                              norm_layer=(None, None, torch.nn.BatchNorm2d),
                                              act_layer=(torch.nn.Hardswish, torch.nn.Hardswish, None)), 128, 14),
        "b1_dsconv_stem": (lambda c: mit.DSConv(c, c, act_layer=(torch.nn.Hardswish, None)), 16, 112),
        "l1_fusedmbconv_s2": (lambda c: mit.FusedMBConv(c, c, expand_ratio=4, act_layer=(gelu, None)), 64, 56),
        "m4_ffn_s1": (lambda c: msra.ResidualDrop(msra.ConvMlp(c, 2 * c)), 128, 14),
    }
    if tiny:
        blocks = {name: (factory, min(channels, 16), 5) for name, (factory, channels, _) in blocks.items()}
    return blocks


BLOCKS = _blocks(tiny=not ON_GPU)
BATCHES = [1, 64, 256] if ON_GPU else [1]
DTYPES = [torch.bfloat16, torch.float16] if ON_GPU else [DTYPE]
VARIANTS = ["eager", "eager-folded", "compile", "patched", "patched-triton"] if ON_GPU \
    else ["eager", "eager-folded", "patched", "patched-triton"]


def _variant(block: torch.nn.Module, variant: str):
    if variant == "eager":
        return block
    if variant == "compile":
        return torch.compile(block, mode="max-autotune")
    wrapped = torch.nn.Sequential(copy.deepcopy(block))
    if variant == "eager-folded":
        evit_kernels.fold_bn(wrapped)
        return wrapped
    evit_kernels.patch(wrapped)
    if variant == "patched-triton":  # the Triton kernels where they apply (depthwise and 1x1), the reference elsewhere
        for m in wrapped.modules():
            if isinstance(m, FusedConvNormAct):
                conv = m._child("conv")
                if conv.kernel_size == (1, 1) or conv.groups == conv.in_channels:
                    m.backend = "conv_bn_act=triton"
    return wrapped


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", list(BLOCKS))
def test_conv_block(measure, name, batch, variant, dtype):
    factory, channels, side = BLOCKS[name]
    block = factory(channels)
    randomize_untrained_state(block)
    block = block.eval().to(DEVICE, dtype)
    fn = _variant(block, variant)
    x = torch.randn(batch, channels, side, side, device=DEVICE, dtype=dtype)
    with torch.inference_mode():
        expected = block(x).float()
        torch.testing.assert_close(fn(x).float(), expected, rtol=5e-2, atol=5e-2 * expected.abs().max().item())
        measure(lambda: fn(x), op=name, batch=batch, variant=variant, min_bytes=2 * x.numel() * x.element_size())
