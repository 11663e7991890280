"""The diffusers models `predict` and `bench` know by name, built from the released configurations with random
weights (nothing is downloaded): Sana's text-to-image transformers, SANA-Video's transformer, and the decoder of
the DC-AE that Sana decodes its latents with.

Sana and the DC-AE decoder take a latent of ``LATENT_CHANNELS`` channels at 1/``DOWNSCALE`` of the image's
resolution: Sana at 1024 px denoises a 32×32 latent (1024 tokens), and the DC-AE decoder turns it into the
1024×1024 image. SANA-Video takes the latent of a video (:func:`latent_shape`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

LATENT_CHANNELS, DOWNSCALE = 32, 32
"""DC-AE f32c32: 32 latent channels, 32× fewer pixels per side than the image."""

CAPTION_TOKENS, CAPTION_CHANNELS = 300, 2304
"""What SanaPipeline gives the transformer: Gemma-2 2B embeddings of the prompt, cut or padded to 300 tokens."""

_SANA_COMMON = {"in_channels": LATENT_CHANNELS, "out_channels": LATENT_CHANNELS, "caption_channels": CAPTION_CHANNELS,
                "mlp_ratio": 2.5, "sample_size": 32, "patch_size": 1}
SANA = {
    "sana-600m": {**_SANA_COMMON, "num_attention_heads": 36, "attention_head_dim": 32, "num_layers": 28,
                  "num_cross_attention_heads": 16, "cross_attention_head_dim": 72, "cross_attention_dim": 1152},
    "sana-1600m": {**_SANA_COMMON, "num_attention_heads": 70, "attention_head_dim": 32, "num_layers": 20,
                   "num_cross_attention_heads": 20, "cross_attention_head_dim": 112, "cross_attention_dim": 2240},
}
"""``SanaTransformer2DModel`` configurations of Sana 600M and 1600M (1024 px checkpoints)."""

SANA_VIDEO = {
    "sana-video-2b": {"in_channels": 16, "out_channels": 16, "num_attention_heads": 20, "attention_head_dim": 112,
                      "num_layers": 20, "num_cross_attention_heads": 20, "cross_attention_head_dim": 112,
                      "cross_attention_dim": 2240, "caption_channels": CAPTION_CHANNELS, "mlp_ratio": 3.0,
                      "sample_size": 30, "patch_size": (1, 2, 2), "qk_norm": "rms_norm_across_heads",
                      "rope_max_seq_len": 1024},
}
"""``SanaVideoTransformer3DModel`` configuration of SANA-Video 2B (480p checkpoint): ReLU linear attention with
rotary embeddings at head dim 112."""

VIDEO_FRAMES, VIDEO_LATENT_CHANNELS, VIDEO_DOWNSCALE, VIDEO_TIME_DOWNSCALE = 81, 16, 8, 4
"""What SanaVideoPipeline generates by default (81 frames) and the Wan 2.1 VAE it decodes with: 16 latent channels,
8× fewer pixels per side, 4× fewer frames after the first (81 frames: 21 latent frames)."""

DC_AE_F32C32 = {
    "latent_channels": LATENT_CHANNELS, "attention_head_dim": 32,
    "encoder_block_types": ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    "decoder_block_types": ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    "encoder_block_out_channels": (128, 256, 512, 512, 1024, 1024),
    "decoder_block_out_channels": (128, 256, 512, 512, 1024, 1024),
    "encoder_layers_per_block": (2, 2, 2, 3, 3, 3), "decoder_layers_per_block": (3, 3, 3, 3, 3, 3),
    "encoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)),
    "decoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)),
    "downsample_block_type": "conv", "upsample_block_type": "interpolate", "decoder_norm_types": "rms_norm",
    "decoder_act_fns": "silu", "scaling_factor": 0.41407,
}
"""``AutoencoderDC`` configuration of dc-ae-f32c32-sana-1.0, the autoencoder of every Sana pipeline (its
conversion to diffusers: ``scripts/convert_dcae_to_diffusers.py``, ``convert_ae``). The f32c32 "in" and "mix"
autoencoders differ (layers (0, 4, 8, 2, 2, 2) / (0, 5, 10, 2, 2, 2), BatchNorm and ReLU in the decoder's first
stages, no multi-scale projection)."""

MODELS = (*SANA, *SANA_VIDEO, "dc-ae-f32c32-decode")


class SanaDenoiser(nn.Module):
    """One denoising call of a Sana transformer as SanaPipeline makes it, as a function of the latents alone: the
    prompt's embeddings (``CAPTION_TOKENS`` tokens), their attention mask (every token kept) and the timestep are
    held here, one of each, and given to every latent of the batch."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer
        self.register_buffer("caption", torch.randn(1, CAPTION_TOKENS, CAPTION_CHANNELS))
        self.register_buffer("caption_mask", torch.ones(1, CAPTION_TOKENS, dtype=torch.int64))
        self.register_buffer("timestep", torch.full((1,), 500.0))

    def forward(self, latents: Tensor) -> Tensor:
        batch = latents.shape[0]
        return self.transformer(latents, self.caption.expand(batch, -1, -1), self.timestep.expand(batch),
                                encoder_attention_mask=self.caption_mask.expand(batch, -1), return_dict=False)[0]


def randomize(model: nn.Module) -> nn.Module:
    """Every parameter random (diffusers zero-initialises some layers, which would hide their mistakes): matrices
    and kernels with a 1/sqrt(fan-in) scale, norm weights about 1, biases and tables about 0.1; BatchNorm statistics
    random too. Returns ``model`` in eval mode."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def build(name: str, device: str | torch.device = "cpu") -> nn.Module:
    """Model ``name`` (one of ``MODELS``) built on ``device`` ("meta": shapes only, in a fraction of a second) with
    random weights, in eval mode: a :class:`SanaDenoiser` around the transformer, or the DC-AE's decoder."""
    from diffusers import AutoencoderDC, SanaTransformer2DModel, SanaVideoTransformer3DModel

    with torch.device(device):
        if name in SANA:
            return randomize(SanaDenoiser(SanaTransformer2DModel(**SANA[name])))
        if name in SANA_VIDEO:
            return randomize(SanaDenoiser(SanaVideoTransformer3DModel(**SANA_VIDEO[name])))
        if name == "dc-ae-f32c32-decode":
            return randomize(AutoencoderDC(**DC_AE_F32C32).decoder)
    raise ValueError(f"unknown diffusers model {name!r}: one of {MODELS}")


def default_res(name: str) -> tuple[int, int]:
    """The resolution model ``name`` is released for: 480×832 for the video transformer, 1024 px otherwise."""
    return (480, 832) if name in SANA_VIDEO else (1024, 1024)


def latent_shape(name: str, batch: int, res: tuple[int, int]) -> tuple[int, ...]:
    """The latent model ``name`` takes for ``batch`` images of ``res`` pixels (each side a multiple of
    ``DOWNSCALE``), or for the video transformer ``batch`` videos of ``VIDEO_FRAMES`` frames (each side a multiple
    of 2·``VIDEO_DOWNSCALE``: its patches are 2×2 latent pixels)."""
    if name in SANA_VIDEO:
        step = 2 * VIDEO_DOWNSCALE
        if any(side % step for side in res):
            raise ValueError(f"{res[0]}x{res[1]}: each side must be a multiple of {step} px")
        frames = 1 + (VIDEO_FRAMES - 1) // VIDEO_TIME_DOWNSCALE
        return batch, VIDEO_LATENT_CHANNELS, frames, res[0] // VIDEO_DOWNSCALE, res[1] // VIDEO_DOWNSCALE
    if any(side % DOWNSCALE for side in res):
        raise ValueError(f"{res[0]}x{res[1]}: each side must be a multiple of {DOWNSCALE} px")
    return batch, LATENT_CHANNELS, res[0] // DOWNSCALE, res[1] // DOWNSCALE
