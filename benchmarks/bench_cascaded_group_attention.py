"""LocalWindowAttention (cascaded group attention in 7x7 / 4x4 windows), inference: eager timm vs torch.compile
vs the same math through scaled_dot_product_attention with a bias tensor vs evit (reference, Triton core, CUDA).

Shapes are the M4 and M5 attention layers at 224 px. ``min_bytes`` is the traffic of a perfect kernel (read the
map once, write it once). On a GPU each record also counts the kernels one call launches (batch 1 is
launch-bound).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from timm.models.efficientvit_msra import LocalWindowAttention

import evit_kernels
from evit_kernels.bench import randomize_untrained_state

from .common import DEVICE, DTYPE, ON_GPU

# name: (channels, heads, map side, window); key_dim 16, kernels (7, 5, 3, 3)[:heads] as in timm's M4/M5.
LAYERS = {
    "m4_stage1": (128, 4, 14, 7), "m4_stage2": (256, 4, 7, 7), "m4_stage3": (384, 4, 4, 4),
    "m5_stage1": (192, 3, 14, 7), "m5_stage3": (384, 4, 4, 4),
} if ON_GPU else {"tiny": (32, 2, 9, 7)}
BATCHES = [1, 64, 256, 2048] if ON_GPU else [1]
DTYPES = [torch.bfloat16, torch.float16] if ON_GPU else [DTYPE]
VARIANTS = ["eager", "compile", "sdpa", "evit-torch", "evit-triton", "evit-cuda"] if ON_GPU \
    else ["eager", "sdpa", "evit-torch", "evit-triton"]


def _module(channels: int, heads: int, side: int, window: int) -> LocalWindowAttention:
    module = LocalWindowAttention(channels, 16, heads, attn_ratio=channels // heads // 16, resolution=side,
                                  window_resolution=window, kernels=[7, 5, 3, 3][:heads])
    randomize_untrained_state(module)
    return module.eval()


def _sdpa(module: LocalWindowAttention):
    """The module's math with the attention through F.scaled_dot_product_attention and a bias tensor."""
    attn = module.attn

    def windows(x):
        B, C, H, W = x.shape
        ws = attn.resolution
        if (H, W) == (ws, ws):
            return x, None
        pad_b, pad_r = (ws - H % ws) % ws, (ws - W % ws) % ws
        x = F.pad(x, (0, pad_r, 0, pad_b))
        nh, nw = (H + pad_b) // ws, (W + pad_r) // ws
        x = x.view(B, C, nh, ws, nw, ws).permute(0, 2, 4, 1, 3, 5).reshape(B * nh * nw, C, ws, ws)
        return x, (B, C, H, W, nh, nw)

    def forward(x):
        xw, meta = windows(x)
        bias = attn.attention_biases[:, attn.attention_bias_idxs].to(x.dtype)
        chunks, outs, feat = xw.chunk(attn.num_heads, dim=1), [], None
        for i, (qkv, dw) in enumerate(zip(attn.qkvs, attn.dws)):
            feat = chunks[0] if i == 0 else feat + chunks[i]
            q, k, v = qkv(feat).split([attn.key_dim, attn.key_dim, attn.val_dim], dim=1)
            q = dw(q)
            out = F.scaled_dot_product_attention(q.flatten(2).transpose(1, 2), k.flatten(2).transpose(1, 2),
                                                 v.flatten(2).transpose(1, 2), attn_mask=bias[i], scale=attn.scale)
            feat = out.transpose(1, 2).reshape(v.shape)
            outs.append(feat)
        y = attn.proj(torch.cat(outs, 1))
        if meta is None:
            return y
        B, C, H, W, nh, nw = meta
        ws = attn.resolution
        y = y.view(B, nh, nw, C, ws, ws).permute(0, 3, 1, 4, 2, 5).reshape(B, C, nh * ws, nw * ws)
        return y[:, :, :H, :W]

    return forward


def _variant(module: LocalWindowAttention, variant: str):
    if variant == "eager":
        return module
    if variant == "compile":
        return torch.compile(module)
    if variant == "sdpa":
        return _sdpa(module)
    patched = torch.nn.Sequential(copy.deepcopy(module))
    backend = variant.removeprefix("evit-")
    evit_kernels.patch(patched, backend="torch" if backend == "torch" else f"cascaded_group_attention={backend}")
    return patched


def _kernel_count(fn, x) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(x)
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_local_window_attention(measure, layer, batch, variant, dtype):
    channels, heads, side, window = LAYERS[layer]
    module = _module(channels, heads, side, window).to(DEVICE, dtype)
    fn = _variant(module, variant)
    x = torch.randn(batch, channels, side, side, device=DEVICE, dtype=dtype)
    with torch.inference_mode():
        expected = module(x).float()
        got = fn(x).float()
        torch.testing.assert_close(got, expected, rtol=5e-2, atol=5e-2 * expected.abs().max().item())
        info = dict(op="LocalWindowAttention", layer=layer, batch=batch, variant=variant,
                    min_bytes=2 * x.numel() * x.element_size())
        if ON_GPU and batch == 1:
            info["kernels"] = _kernel_count(fn, x)
        measure(lambda: fn(x), **info)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["eager", "compile", "patched"] if ON_GPU else ["eager", "patched"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_efficientvit_block(measure, layer, batch, variant, dtype):
    """The whole M-series block: dw0 -> ffn0 -> window attention -> dw1 -> ffn1, each residual."""
    from timm.models.efficientvit_msra import EfficientVitBlock

    channels, heads, side, window = LAYERS[layer]
    block = EfficientVitBlock(channels, 16, heads, attn_ratio=channels // heads // 16, resolution=side,
                              window_resolution=window, kernels=[7, 5, 3, 3][:heads])
    randomize_untrained_state(block)
    block = block.eval().to(DEVICE, dtype)
    if variant == "compile":
        fn = torch.compile(block)
    elif variant == "patched":
        fn = torch.nn.Sequential(copy.deepcopy(block))
        evit_kernels.patch(fn)
    else:
        fn = block
    x = torch.randn(batch, channels, side, side, device=DEVICE, dtype=dtype)
    with torch.inference_mode():
        expected = block(x).float()
        torch.testing.assert_close(fn(x).float(), expected, rtol=5e-2, atol=5e-2 * expected.abs().max().item())
        measure(lambda: fn(x), op="EfficientVitBlock", layer=layer, batch=batch, variant=variant,
                min_bytes=2 * x.numel() * x.element_size())
