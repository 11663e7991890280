"""`python -m evit_kernels bench` on a tiny real model, on CPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_bench_prints_table_and_saves_json(tmp_path):
    out_json = tmp_path / "m0.json"
    run = subprocess.run(
        [sys.executable, "-m", "evit_kernels", "bench", "--model", "efficientvit_m0", "--batch", "2",
         "--res", "64", "64", "--device", "cpu", "--no-compile", "--warmup", "1", "--iters", "2",
         "--json", str(out_json)],
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "efficientvit_m0  batch 2  64x64  fp32" in run.stdout
    for variant in ("eager", "patched"):
        assert variant in run.stdout
    assert "patch: swapped" in run.stdout
    assert "[1/4] building efficientvit_m0" in run.stderr and "round 2/2" in run.stderr  # progress on stderr
    saved = json.loads(out_json.read_text())
    assert [r["variant"] for r in saved["results"]] == ["eager", "patched"]
    assert all(r["agrees"] and r["ms_per_batch"] > 0 for r in saved["results"])
    assert saved["results"][1]["rel_err"] < 1e-4


def test_bench_rejects_unknown_dtype():
    run = subprocess.run([sys.executable, "-m", "evit_kernels", "bench", "--dtype", "fp8"], capture_output=True,
                         text=True)
    assert run.returncode != 0 and "invalid choice" in run.stderr


@pytest.mark.slow
def test_bench_compiles_the_patched_model_too(monkeypatch):
    """With torch.compile on, the fourth variant is the patched model (fused modules inside) under the compiler."""
    import torch

    from evit_kernels import bench
    from evit_kernels.nn._base import FusedModule

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: compiled.append(model) or model)
    report = bench.run("efficientvit_m0", 1, (64, 64), "fp32", "cpu", "default", 0, 1)
    assert [r.variant for r in report.results] == ["eager", "torch.compile", "patched", "patched+compile"]
    assert not any(isinstance(m, FusedModule) for m in compiled[0].modules())
    assert any(isinstance(m, FusedModule) for m in compiled[1].modules())
    assert all(r.agrees for r in report.results)


@pytest.mark.slow
def test_host_time_counts_op_calls_and_stubbed_launches():
    """benchmarks/host_time.py runs the patched model on the kernels with every launch stubbed: each op call
    launches at least one kernel, and none of them runs (a B1 forward on the interpreter would take minutes)."""
    run = subprocess.run([sys.executable, "-m", "benchmarks.host_time", "--model", "efficientvit_b1", "--repeats", "2"],
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent)
    assert run.returncode == 0, run.stdout + run.stderr
    words = run.stdout.split()
    op_calls, launches = (int(words[words.index(what) - 1]) for what in ("op", "launches,"))
    assert 0 < op_calls <= launches
    assert "host time, not GPU time" in run.stdout
