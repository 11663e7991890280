"""LoRA fine-tuning steps of a patched Sana transformer, and a patched DC-AE decode, as they sit in a pipeline.

The transformer's linear-attention processors and RMSNorms and the autoencoder's channel RMSNorms and multi-scale
attentions are swapped; the LoRA adapter (peft) goes on to_q / to_k / to_v / to_out as usual and keeps working
through the fused processors. Without --pretrained, both models are built at a small size with random weights
(offline); with it, they come from the hub (e.g. Efficient-Large-Model/Sana_600M_1024px_diffusers).

    python python/sana_lora.py --steps 10 --batch 2 --res 32
"""

from __future__ import annotations

import argparse
import contextlib
import types

import torch
from diffusers import AutoencoderDC, SanaTransformer2DModel
from peft import LoraConfig

import evit_kernels


def _random(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5 if p.dim() > 1 else 1 + 0.1 * torch.randn_like(p))
    return model


def build(pretrained: str | None) -> types.SimpleNamespace:
    """The two models a Sana pipeline holds, as ``pipe.transformer`` and ``pipe.vae``."""
    if pretrained:
        return types.SimpleNamespace(
            transformer=SanaTransformer2DModel.from_pretrained(pretrained, subfolder="transformer"),
            vae=AutoencoderDC.from_pretrained(pretrained, subfolder="vae"))
    transformer = SanaTransformer2DModel(
        in_channels=8, out_channels=8, num_attention_heads=4, attention_head_dim=32, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=32, cross_attention_dim=128, caption_channels=32,
        sample_size=8, qk_norm="rms_norm_across_heads")
    vae = AutoencoderDC(
        in_channels=3, latent_channels=8, attention_head_dim=8,
        encoder_block_types=("ResBlock", "EfficientViTBlock"), decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(16, 32), decoder_block_out_channels=(16, 32),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)))
    return types.SimpleNamespace(transformer=_random(transformer), vae=_random(vae))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", default=None, help="a diffusers Sana repository (needs the hub)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--res", type=int, default=32, help="latent size, in latent pixels")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = build(args.pretrained)
    transformer, vae = pipe.transformer.to(device), pipe.vae.to(device).eval()
    print(evit_kernels.patch(pipe.transformer))
    print(evit_kernels.patch(pipe.vae))

    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)

    # A fixed batch the adapter can learn (flow matching on random latents): the loss must go down.
    config = transformer.config
    latents = torch.randn(args.batch, config.in_channels, args.res, args.res, device=device)
    noise = torch.randn_like(latents)
    caption = torch.randn(args.batch, 4, config.caption_channels, device=device)
    t = torch.full((args.batch,), 500.0, device=device)
    noisy = 0.5 * latents + 0.5 * noise
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
    transformer.train()
    for step in range(args.steps):
        with autocast:
            velocity = transformer(noisy, encoder_hidden_states=caption, timestep=t).sample
            loss = torch.nn.functional.mse_loss(velocity.float(), noise - latents)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        print(f"step {step}: loss {loss.item():.4f}")

    with torch.no_grad():
        image = vae.decode(latents[:1, :vae.config.latent_channels]).sample
        evit_kernels.unpatch(vae)
        eager = vae.decode(latents[:1, :vae.config.latent_channels]).sample
    print(f"decoded {tuple(image.shape)}, max |patched - eager| {(image - eager).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
