"""Small diffusers models of the Sana family, built offline with random weights: the image and video transformers
and the DC-AE autoencoder, each with the structure of the released ones (same blocks and processors) at a few
channels, so that the Triton interpreter runs them in seconds."""

from __future__ import annotations

import torch
from torch import nn

from evit_kernels.diffusers_models import randomize

HEADS, HEAD_DIM = 2, 8
"""Two heads of a head dim the Triton kernels take."""


def sana_transformer(qk_norm: str | None = None) -> nn.Module:
    """A two-block ``SanaTransformer2DModel`` (``qk_norm="rms_norm_across_heads"``: Sana 1.5's q/k norms)."""
    from diffusers import SanaTransformer2DModel

    return randomize(SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=HEADS * HEAD_DIM,
        caption_channels=8, mlp_ratio=2.5, sample_size=8, patch_size=1, qk_norm=qk_norm))


def sana_transformer_inputs(batch: int = 2, size: tuple[int, int] = (6, 5), dtype=torch.float32) -> dict:
    """Latents (B, 4, H, W), a caption (B, 3, 8) and timesteps: N = H·W tokens (30 by default, not a power of 2)."""
    return {"hidden_states": torch.randn(batch, 4, *size, dtype=dtype),
            "encoder_hidden_states": torch.randn(batch, 3, 8, dtype=dtype),
            "timestep": torch.tensor([10.0, 500.0][:batch] + [1.0] * (batch - 2), dtype=dtype)}


def sana_video_transformer(heads: int = HEADS, head_dim: int = HEAD_DIM, layers: int = 2) -> nn.Module:
    """A ``SanaVideoTransformer3DModel`` of ``layers`` blocks (RoPE in its linear attention, q/k norms across heads)."""
    from diffusers import SanaVideoTransformer3DModel

    return randomize(SanaVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=heads, attention_head_dim=head_dim, num_layers=layers,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=heads * head_dim,
        caption_channels=8, mlp_ratio=2.5, sample_size=8, patch_size=(1, 2, 2), rope_max_seq_len=32))


def sana_video_inputs(batch: int = 1, frames: int = 2, size: tuple[int, int] = (6, 4), dtype=torch.float32) -> dict:
    """Latents (B, 4, F, H, W) and a caption: F·H·W/4 tokens (12 by default)."""
    return {"hidden_states": torch.randn(batch, 4, frames, *size, dtype=dtype),
            "encoder_hidden_states": torch.randn(batch, 3, 8, dtype=dtype),
            "timestep": torch.tensor([10.0] * batch, dtype=dtype)}


def autoencoder_dc(norm: str = "rms_norm") -> nn.Module:
    """A small ``AutoencoderDC`` with every kind of block of the released ones: ResBlocks, EfficientViT blocks
    (``SanaMultiscaleLinearAttention`` with a 3×3 multi-scale projection, ``GLUMBConv``), pixel (un)shuffle, and the
    decoder's ``norm`` ("rms_norm" as released, or "batch_norm")."""
    from diffusers import AutoencoderDC

    return randomize(AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=HEAD_DIM,
        encoder_block_types=("ResBlock", "EfficientViTBlock"), decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 16), decoder_block_out_channels=(8, 16),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), (3,)), decoder_qkv_multiscales=((), (3,)),
        decoder_norm_types=norm, decoder_act_fns="silu"))
