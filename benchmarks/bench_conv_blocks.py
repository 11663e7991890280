"""Conv + BatchNorm + activation blocks at real EfficientViT shapes, inference: eager (BatchNorm unfolded and
folded) vs torch.compile (max-autotune) vs patched on the reference vs patched on this package's kernels (conv_block:
DSConv in one kernel, the other blocks layer by layer; the FFN; the residual depthwise).

``min_bytes`` is the traffic of a whole-block fused kernel (read the input once, write the output once; the
expanded tensor never leaves the chip), the floor that block fusion aims at.
"""

from __future__ import annotations

import copy

import pytest
import torch
from timm.layers.activations import GELUTanh
from timm.models import efficientvit_mit as mit
from timm.models import efficientvit_msra as msra

import evit_kernels
from evit_kernels.bench import randomize_untrained_state

from .common import DEVICE, DTYPE, KERNELS, ON_GPU


def _residual(block: torch.nn.Module) -> torch.nn.Module:
    return mit.ResidualBlock(block, torch.nn.Identity())  # how the models hold every MBConv / DSConv / FusedMBConv


def _blocks(tiny: bool) -> dict:
    """name -> (factory, channels, (height, width), batches): the blocks of B1 / B3 / L1 / L2 at 224 px (stage 3-4
    MBConv, stem DSConv, stage-2 FusedMBConv), B1's stage-1 MBConv at 1024×2048, the SAM-L0 neck's FusedMBConv at
    512 px, and M4's FFN and residual depthwise; tiny maps on CPU."""
    mbconv = {  # timm's EfficientViT blocks: bias and activation on expand and depthwise, BN on the project only
        "use_bias": (True, True, False), "norm_layer": (None, None, torch.nn.BatchNorm2d)}
    blocks = {
        "b1_mbconv_s3": (lambda c: _residual(mit.MBConv(c, c, expand_ratio=4, act_layer=(
            torch.nn.Hardswish, torch.nn.Hardswish, None), **mbconv)), 128, (14, 14), None),
        "b1_dsconv_stem": (lambda c: _residual(mit.DSConv(c, c, act_layer=(torch.nn.Hardswish, None))), 16,
                           (112, 112), None),
        "b1_mbconv_s1_1024x2048": (lambda c: _residual(mit.MBConv(c, c, expand_ratio=4, act_layer=(
            torch.nn.Hardswish, torch.nn.Hardswish, None), **mbconv)), 32, (256, 512), [1]),
        "b3_mbconv_s4": (lambda c: _residual(mit.MBConv(c, c, expand_ratio=4, act_layer=(
            torch.nn.Hardswish, torch.nn.Hardswish, None), **mbconv)), 512, (7, 7), None),
        "l1_fusedmbconv_s2": (lambda c: _residual(mit.FusedMBConv(c, c, expand_ratio=4, act_layer=(GELUTanh, None))),
                              64, (56, 56), None),
        "l2_mbconv_s4": (lambda c: _residual(mit.MBConv(c, c, expand_ratio=6, act_layer=(GELUTanh, GELUTanh, None),
                                                        **mbconv)), 512, (7, 7), None),
        "sam_l0_neck_fusedmbconv": (lambda c: _residual(mit.FusedMBConv(c, c, expand_ratio=1, act_layer=(
            GELUTanh, None))), 256, (32, 32), None),
        "m4_ffn_s1": (lambda c: msra.ResidualDrop(msra.ConvMlp(c, 2 * c)), 128, (14, 14), None),
        "m4_residual_dw_s1": (lambda c: msra.ResidualDrop(msra.ConvNorm(c, c, 3, 1, 1, groups=c)), 128, (14, 14),
                              None),
    }
    if tiny:
        blocks = {name: (factory, min(channels, 16), (5, 5), None)
                  for name, (factory, channels, _, _) in blocks.items()}
    return blocks


BLOCKS = _blocks(tiny=not ON_GPU)
BATCHES = [1, 64, 256] if ON_GPU else [1]
DTYPES = [torch.bfloat16, torch.float16] if ON_GPU else [DTYPE]
VARIANTS = ["eager", "eager-folded", "compile", "patched", "kernels"] if ON_GPU \
    else ["eager", "eager-folded", "patched", "kernels"]


def _variant(block: torch.nn.Module, variant: str):
    if variant == "eager":
        return block
    if variant == "compile":
        return torch.compile(block, mode="max-autotune")
    wrapped = torch.nn.Sequential(copy.deepcopy(block))
    if variant == "eager-folded":
        evit_kernels.fold_bn(wrapped)
        return wrapped
    evit_kernels.patch(wrapped, backend=KERNELS if variant == "kernels" else "auto")
    return wrapped


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", list(BLOCKS))
def test_conv_block(measure, name, batch, variant, dtype):
    factory, channels, (height, width), batches = BLOCKS[name]
    if batches is not None and batch not in batches:
        pytest.skip(f"{name} runs at batch {batches}")
    block = factory(channels)
    randomize_untrained_state(block)
    block = block.eval().to(DEVICE, dtype)
    fn = _variant(block, variant)
    x = torch.randn(batch, channels, height, width, device=DEVICE, dtype=dtype)
    with torch.inference_mode():
        expected = block(x).float()
        torch.testing.assert_close(fn(x).float(), expected, rtol=5e-2, atol=5e-2 * expected.abs().max().item())
        measure(lambda: fn(x), op=name, batch=batch, variant=variant, min_bytes=2 * x.numel() * x.element_size())
