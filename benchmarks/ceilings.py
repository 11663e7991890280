"""The two ceilings every GPU result is read against: measured copy bandwidth and bf16 matmul rate. Without a GPU
(the GPU pass's dry run) the same measurement runs on the CPU at small sizes, to check the script, not the CPU."""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.common import bench_ms


def measure() -> dict:
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    n, m = (1 << 28, 8192) if on_gpu else (1 << 20, 256)  # on a GPU: 512 MiB of bf16 per buffer, far beyond L2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    copy_ms = bench_ms(lambda: dst.copy_(src))
    a = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    mm_ms = bench_ms(lambda: a @ a)
    return {
        "gpu": torch.cuda.get_device_name() if on_gpu else "none (CPU)",
        "copy_GBps": 2 * src.numel() * src.element_size() / copy_ms / 1e6,
        "bf16_matmul_TFLOPs": 2 * m**3 / mm_ms / 1e9,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    result = measure()
    print(f"{result['gpu']}: copy {result['copy_GBps']:.0f} GB/s, "
          f"bf16 matmul {result['bf16_matmul_TFLOPs']:.2f} TFLOP/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
