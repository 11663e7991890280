"""Inference with a patched timm EfficientViT: patch, check against the original, time both.

    python python/timm_inference.py --model efficientvit_b1 --batch 8 --res 224
"""

from __future__ import annotations

import argparse
import copy
import time

import timm
import torch

import evit_kernels


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientvit_b1")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--res", type=int, default=224)
    parser.add_argument("--pretrained", action="store_true", help="download timm weights (needs network)")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = timm.create_model(args.model, pretrained=args.pretrained).eval().to(device, dtype)
    patched = copy.deepcopy(model)
    print(evit_kernels.patch(patched))

    x = torch.randn(args.batch, 3, args.res, args.res, device=device, dtype=dtype)
    with torch.inference_mode():
        for name, m in (("eager", model), ("patched", patched)):
            m(x)  # warm-up
            if device == "cuda":
                torch.cuda.synchronize()
            began = time.perf_counter()
            y = m(x)
            if device == "cuda":
                torch.cuda.synchronize()
            print(f"{name:<8} {(time.perf_counter() - began) * 1e3:8.2f} ms  top-1 of image 0: {y[0].argmax().item()}")
        diff = (patched(x).float() - model(x).float()).abs().max().item()
    print(f"max |patched - eager| = {diff:.3e}")


if __name__ == "__main__":
    main()
