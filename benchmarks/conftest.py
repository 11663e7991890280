"""The `measure` fixture: synchronised pytest-benchmark timing with device, versions and commit recorded."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from .common import DTYPE, ON_GPU


def _commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=Path(__file__).parent)
    return out.stdout.strip() or "unknown"


@pytest.fixture
def measure(benchmark):
    """``measure(fn, **info)``: time ``fn`` (synchronised, warmed up) and record device, versions and commit."""

    def run(fn, rounds: int = 20, warmup: int = 5, **info):
        def synced():
            fn()
            if ON_GPU:
                torch.cuda.synchronize()

        benchmark.extra_info.update(
            device=torch.cuda.get_device_name() if ON_GPU else "cpu", torch=torch.__version__, commit=_commit(),
            dtype=str(DTYPE).removeprefix("torch."), **info)
        return benchmark.pedantic(synced, rounds=rounds, iterations=1, warmup_rounds=warmup)

    return run
