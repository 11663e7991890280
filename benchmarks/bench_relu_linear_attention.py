"""LiteMLA: the attention core and the whole module, eager (timm, mit-han-lab) vs torch.compile vs evit.

Shapes are the LiteMLA layers of B1 (stages 3, 4), B3 and L1 at 224 px and B1 at 1024x2048. ``min_bytes`` in
each record is the traffic of a perfect kernel (read qkv and the aggregated map once, write the output once),
so achieved GB/s = min_bytes / time; see benchmarks/summarize.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from efficientsam.models.nn.ops import LiteMLA as MitLiteMLA
from timm.models.efficientvit_mit import LiteMLA as TimmLiteMLA

import evit_kernels
from evit_kernels.ops.relu_linear_attention import relu_linear_attention

from .common import DEVICE, DTYPE, ON_GPU

# name: (channels, head dim, H, W)
LAYERS = {
    "b1_stage3_224": (128, 16, 14, 14), "b1_stage4_224": (256, 16, 7, 7), "b3_stage4_224": (512, 32, 7, 7),
    "l1_stage4_224": (512, 32, 7, 7), "b1_stage3_1024x2048": (128, 16, 64, 128),
    "b1_stage4_1024x2048": (256, 16, 32, 64),
} if ON_GPU else {"tiny": (32, 8, 5, 7)}
BATCHES = {"224": [1, 64, 256], "1024x2048": [1, 4]} if ON_GPU else {"tiny": [1]}
DTYPES = [torch.bfloat16, torch.float16] if ON_GPU else [DTYPE]
CASES = [(name, batch) for name in LAYERS for batch in BATCHES[name.rsplit("_", 1)[-1]]]


def _timm_core(module: TimmLiteMLA):
    """timm's own attention path from the qkv and aggregated maps: concat, reshape, pad, fp32 matmuls."""
    def core(qkv, aggregated):
        batch, _, height, width = qkv.shape
        multi = torch.cat([qkv, *aggregated], dim=1).reshape(batch, -1, 3 * module.dim, height * width)
        q, k, v = multi.transpose(-1, -2).chunk(3, dim=-1)
        out = module._attn(torch.relu(q), torch.relu(k), torch.nn.functional.pad(v, (0, 1), value=1.0))
        return out.transpose(-1, -2).reshape(batch, -1, height, width)
    return core


def _inputs(channels, height, width, batch, dtype):
    qkv = torch.randn(batch, 3 * channels, height, width, device=DEVICE, dtype=dtype)
    return qkv, [torch.randn_like(qkv)]


def _min_bytes(channels, height, width, batch, dtype) -> int:
    element = torch.empty(0, dtype=dtype).element_size()
    return (2 * 3 * channels + 2 * channels) * height * width * batch * element


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["timm", "compile", "evit-torch", "evit-triton"])
@pytest.mark.parametrize("layer, batch", CASES)
def test_core(measure, layer, batch, variant, dtype):
    channels, dim, height, width = LAYERS[layer]
    if variant == "compile" and not ON_GPU:
        pytest.skip("torch.compile is timed on a GPU only (CPU runs are smoke tests)")
    qkv, aggregated = _inputs(channels, height, width, batch, dtype)
    timm_core = _timm_core(TimmLiteMLA(channels, channels, dim=dim).to(DEVICE))
    fn = {"timm": timm_core, "compile": torch.compile(timm_core),
          "evit-torch": lambda q, a: relu_linear_attention(q, a, dim, 1e-5, backend="torch"),
          "evit-triton": lambda q, a: relu_linear_attention(q, a, dim, 1e-5, backend="triton")}[variant]
    with torch.inference_mode():
        expected = timm_core(qkv, aggregated).float()
        got = fn(qkv, aggregated).float()
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
        measure(lambda: fn(qkv, aggregated), op="relu_linear_attention", layer=layer, batch=batch, variant=variant,
                min_bytes=_min_bytes(channels, height, width, batch, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["timm", "mit-han-lab", "compile", "patched", "patched-triton"])
@pytest.mark.parametrize("layer, batch", CASES)
def test_module(measure, layer, batch, variant, dtype):
    channels, dim, height, width = LAYERS[layer]
    if variant == "compile" and not ON_GPU:
        pytest.skip("torch.compile is timed on a GPU only (CPU runs are smoke tests)")
    timm_module = TimmLiteMLA(channels, channels, dim=dim).to(DEVICE, dtype).eval()
    if variant == "mit-han-lab":
        module = MitLiteMLA(channels, channels, dim=dim).to(DEVICE, dtype).eval()
        module.load_state_dict(timm_module.state_dict())
    elif variant == "compile":
        module = torch.compile(timm_module)
    elif variant.startswith("patched"):
        module = torch.nn.Sequential(copy.deepcopy(timm_module))
        # patched-triton: the core, and the aggregation folded into it (the module's eval path), on Triton
        triton = "relu_linear_attention=triton,relu_linear_attention_aggregated=triton"
        evit_kernels.patch(module, backend=triton if variant == "patched-triton" else "auto")
    else:
        module = timm_module
    x = torch.randn(batch, channels, height, width, device=DEVICE, dtype=dtype)
    with torch.inference_mode():
        expected = timm_module(x).float()
        got = module(x).float()
        torch.testing.assert_close(got, expected, rtol=5e-2, atol=5e-2 * expected.abs().max().item())
        measure(lambda: module(x), op="LiteMLA", layer=layer, batch=batch, variant=variant,
                min_bytes=_min_bytes(channels, height, width, batch, dtype))
