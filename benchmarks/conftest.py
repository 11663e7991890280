"""The `measure` fixture: synchronised pytest-benchmark timing with device, versions, commit and the backend that
ran each evit op recorded."""

from __future__ import annotations

import os

import pytest
import torch

from evit_kernels import dispatch
from evit_kernels.bench import git_commit

from .common import DTYPE, ON_GPU

COMMIT = git_commit()
ROUNDS = int(os.environ.get("EVIT_BENCH_ROUNDS", "0"))
"""When set, every benchmark times this many rounds after no extra warm-up (the GPU pass's dry run: 1)."""
KERNEL_VARIANTS = {"kernels", "kernels+graph", "evit-triton", "evit-cuda", "patched-triton"}
"""Variants that claim to time this package's kernels: each must run at least one op on a kernel backend."""


@pytest.fixture
def measure(benchmark):
    """``measure(fn, **info)``: time ``fn`` (synchronised, warmed up), record device, versions, commit and backends,
    and return ``fn``'s result (with --benchmark-disable, from its one call)."""

    def run(fn, rounds: int = 20, warmup: int = 5, **info):
        def synced():
            out = fn()
            if ON_GPU:
                torch.cuda.synchronize()
            return out

        # Which backend ran each op: recorded over the first warm-up call (or over the single untimed call that
        # --benchmark-disable makes), never inside the timed rounds.
        with dispatch.recording() as runs:
            if benchmark.disabled:
                result = benchmark.pedantic(synced)
            else:
                synced()
        backends = sorted({f"{op}={backend}" for op, backend in runs})
        if info.get("variant") in KERNEL_VARIANTS:
            assert any(not b.endswith("=torch") for b in backends), f"{info['variant']} ran no kernel: {backends}"
        benchmark.extra_info.update(
            device=torch.cuda.get_device_name() if ON_GPU else "cpu", torch=torch.__version__, commit=COMMIT,
            dtype=str(DTYPE).removeprefix("torch."), backends=backends, **info)
        if benchmark.disabled:
            return result
        rounds, warmup = (ROUNDS, 1) if ROUNDS else (rounds, warmup)
        return benchmark.pedantic(synced, rounds=rounds, iterations=1, warmup_rounds=max(warmup - 1, 0))

    return run
