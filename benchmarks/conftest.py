"""The `measure` fixture: synchronised pytest-benchmark timing with device, versions and commit recorded."""

from __future__ import annotations

import pytest
import torch

from evit_kernels.bench import git_commit

from .common import DTYPE, ON_GPU

COMMIT = git_commit()


@pytest.fixture
def measure(benchmark):
    """``measure(fn, **info)``: time ``fn`` (synchronised, warmed up) and record device, versions and commit."""

    def run(fn, rounds: int = 20, warmup: int = 5, **info):
        def synced():
            fn()
            if ON_GPU:
                torch.cuda.synchronize()

        benchmark.extra_info.update(
            device=torch.cuda.get_device_name() if ON_GPU else "cpu", torch=torch.__version__, commit=COMMIT,
            dtype=str(DTYPE).removeprefix("torch."), **info)
        return benchmark.pedantic(synced, rounds=rounds, iterations=1, warmup_rounds=warmup)

    return run
