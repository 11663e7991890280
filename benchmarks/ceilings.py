"""The two ceilings every GPU result is read against: measured copy bandwidth and bf16 matmul rate."""

from __future__ import annotations

import argparse
import json

import torch
from triton.testing import do_bench


def measure() -> dict:
    n = 1 << 28  # 512 MiB of bf16 per buffer: far beyond L2
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    mm_ms = do_bench(lambda: a @ a)
    return {
        "gpu": torch.cuda.get_device_name(),
        "copy_GBps": 2 * src.numel() * src.element_size() / copy_ms / 1e6,
        "bf16_matmul_TFLOPs": 2 * 8192**3 / mm_ms / 1e9,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    result = measure()
    print(f"{result['gpu']}: copy {result['copy_GBps']:.0f} GB/s, "
          f"bf16 matmul {result['bf16_matmul_TFLOPs']:.0f} TFLOP/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
