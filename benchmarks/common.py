"""Where and in what precision the benchmarks run: real shapes on a GPU, tiny smoke shapes on CPU."""

import statistics
import time
from collections.abc import Callable

import torch

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPE = torch.bfloat16 if ON_GPU else torch.float32

KERNELS = "experimental"
"""The backend request of the variants timed on this package's kernels: each kernel wherever it takes the inputs.
Under "auto" a kernel runs only where it measured faster on this GPU model (evit_kernels/measured.py): a GPU without
measurements would run the reference everywhere."""


def bench_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn``: ``triton.testing.do_bench`` on a GPU (L2 flushed before each call), wall
    clock over a few calls on the CPU (where timing only checks the script)."""
    if ON_GPU:
        from triton.testing import do_bench

        return do_bench(fn, warmup=5, rep=25)
    times = []
    for _ in range(3):
        began = time.perf_counter()
        fn()
        times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)
