"""A few training steps of a patched model: the optimizer is built before patching and keeps working, BatchNorm
keeps its training semantics, and checkpoints keep their keys.

    python python/train_patched.py --model efficientvit_m4 --steps 10 --batch 32
"""

from __future__ import annotations

import argparse
import contextlib

import timm
import torch

import evit_kernels


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientvit_b1")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--res", type=int, default=224)
    parser.add_argument("--classes", type=int, default=10)
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = timm.create_model(args.model, pretrained=False, num_classes=args.classes).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    keys = list(model.state_dict())
    print(evit_kernels.patch(model))
    assert list(model.state_dict()) == keys

    # A fixed batch the model can learn: the loss must go down.
    x = torch.randn(args.batch, 3, args.res, args.res, device=device)
    target = torch.randint(0, args.classes, (args.batch,), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
    for step in range(args.steps):
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(x), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        print(f"step {step}: loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
