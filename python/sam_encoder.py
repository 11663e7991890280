"""The EfficientViT-SAM image encoder (mit-han-lab code from the `efficientsam` package), patched.

    python python/sam_encoder.py --model efficientvit-sam-l0 --batch 16 --res 512
"""

from __future__ import annotations

import argparse
import contextlib
import copy

import torch
from efficientsam.sam_model_zoo import create_efficientvit_sam_model

import evit_kernels


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientvit-sam-l0", help="efficientvit-sam-l0/l1/l2/xl0/xl1")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--res", type=int, default=512)
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    encoder = create_efficientvit_sam_model(args.model, pretrained=False).image_encoder.eval().to(device)
    patched = copy.deepcopy(encoder)
    print(evit_kernels.patch(patched))

    # The SAM neck upsamples in fp32, so low precision goes through autocast, as upstream runs it.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
    x = torch.randn(args.batch, 3, args.res, args.res, device=device)
    with torch.inference_mode(), autocast:
        expected, got = encoder(x), patched(x)
    print(f"image embeddings {tuple(got.shape)}, max |patched - eager| = "
          f"{(got.float() - expected.float()).abs().max().item():.3e}")


if __name__ == "__main__":
    main()
