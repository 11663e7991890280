"""The released EfficientViT M0-M5 cascaded-group-attention configurations and random folded inputs for them,
shared by the CUDA and Triton tests of evit::cascaded_group_attention."""

from __future__ import annotations

import torch

# (channels, heads, depthwise kernel per head) of every stage of timm's efficientvit_m0..m5 (key_dim 16 and value
# dim channels/heads everywhere); test_released_configurations_match_timm keeps this in step with timm.
RELEASED = {
    "m0": [(64, 4, (5, 5, 5, 5)), (128, 4, (5, 5, 5, 5)), (192, 4, (5, 5, 5, 5))],
    "m1": [(128, 2, (7, 5)), (144, 3, (7, 5, 3)), (192, 3, (7, 5, 3))],
    "m2": [(128, 4, (7, 5, 3, 3)), (192, 3, (7, 5, 3)), (224, 2, (7, 5))],
    "m3": [(128, 4, (5, 5, 5, 5)), (240, 3, (5, 5, 5)), (320, 4, (5, 5, 5, 5))],
    "m4": [(128, 4, (7, 5, 3, 3)), (256, 4, (7, 5, 3, 3)), (384, 4, (7, 5, 3, 3))],
    "m5": [(192, 3, (7, 5, 3)), (288, 3, (7, 5, 3)), (384, 4, (7, 5, 3, 3))],
}
CONFIGS = sorted({config for stages in RELEASED.values() for config in stages})
KEY_DIM = 16

def folded_inputs(config, H, W, window, dtype, device, batch=2, requires_grad=False):
    """Random folded weights scaled so that every activation, and the logits, are of order one."""
    channels, heads, kernels = config
    val_dim = channels // heads
    rows = 2 * KEY_DIM + val_dim

    def t(*shape, std):
        return (torch.randn(*shape, device=device) * std).to(dtype).requires_grad_(requires_grad)

    return (t(batch, channels, H, W, std=1.0),
            [t(rows, val_dim, 1, 1, std=val_dim ** -0.5) for _ in range(heads)],
            [t(rows, std=0.1) for _ in range(heads)],
            [t(KEY_DIM, 1, k, k, std=1.0 / k) for k in kernels],
            [t(KEY_DIM, std=0.1) for _ in kernels],
            t(heads, window * window, std=1.0),
            t(channels, channels, 1, 1, std=channels ** -0.5),
            t(channels, std=0.1),
            KEY_DIM, window)


def whole_map_terms(config, window):
    """The longest chain of sums behind one output of the whole-map op: the qkv conv, the depthwise on q, the
    scores, softmax and value sums over the window's tokens, and the projection."""
    channels, heads, kernels = config
    return channels // heads + max(kernels) ** 2 + KEY_DIM + 2 * window**2 + channels


def cast(args, dtype):
    return torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.detach().to(dtype), args)
