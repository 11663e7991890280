"""Training at scale goes through PyTorch's own machinery: DDP (2 CPU processes, gloo) and SyncBatchNorm."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import evit_kernels
from tests.models import assert_same_gradients, build, rel_err

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        eager = build("efficientvit_b0").train()
        patched = copy.deepcopy(eager)
        evit_kernels.patch(patched)
        x = torch.randn(2 * world, 3, 64, 64)[2 * rank: 2 * rank + 2]  # each rank its own shard
        grads = {}
        for tag, model in (("eager", eager), ("patched", patched)):
            ddp = DistributedDataParallel(model)  # kept alive: its reducer all-reduces during backward
            ddp(x).square().mean().backward()
            grads[tag] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        torch.save(grads, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_match_unpatched(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for grads in ranks:
        assert_same_gradients(grads["patched"], grads["eager"])
    for name, g in ranks[0]["patched"].items():  # all-reduced: every rank holds the same gradient
        assert torch.allclose(g, ranks[1]["patched"][name], rtol=1e-5, atol=1e-7), name


def test_sync_batchnorm_conversion_after_patch():
    model = build("efficientvit_b0")
    patched = copy.deepcopy(model)
    evit_kernels.patch(patched)
    patched = torch.nn.SyncBatchNorm.convert_sync_batchnorm(patched)
    assert not any(type(m) is torch.nn.BatchNorm2d for m in patched.modules())
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in patched.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(patched(x), model(x)) < 1e-4  # eval: the converted BatchNorms still fold
    patched.train()
    model.train()
    out, expected = patched(x), model(x)  # train without a process group: SyncBatchNorm computes locally
    assert rel_err(out, expected) < 1e-4
    state, expected_state = patched.state_dict(), model.state_dict()
    for key in expected_state:
        if key.endswith("running_mean"):
            assert rel_err(state[key], expected_state[key]) < 1e-5, key
