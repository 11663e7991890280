"""The optional CUDA build: detection of the toolkit, the skip switch, and the compiled extension itself."""

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from evit_kernels import _extension

ROOT = Path(__file__).resolve().parents[1]


def _setup_module():
    spec = importlib.util.spec_from_file_location("evit_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the helpers; setup() only runs as __main__
    return module


@pytest.mark.skipif(os.environ.get("EVIT_REQUIRE_EXTENSION") != "1",
                    reason="EVIT_REQUIRE_EXTENSION=1 is set where the build must have produced evit_kernels._C")
def test_extension_was_built_and_imports():
    assert _extension.load_error() is None
    import evit_kernels._C  # noqa: F401

    assert "9.0" in _extension.built_archs()
    assert torch.ops.evit.cuda_build_version() >= 11000


def test_extension_state_is_explained():
    report = _extension.load_error()
    if report is None:
        assert _extension.built_archs(), "a loaded extension must report the archs it was built for"
    else:
        assert _extension.built_archs() == [] and len(report) > 10


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc on PATH")
def test_cuda_home_found_through_an_nvcc_wrapper(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    wrapper = tmp_path / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("nvcc")} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    home = _setup_module().find_cuda_home()
    assert home is not None and home != str(tmp_path.parent)
    assert (Path(home) / "include" / "cuda_runtime.h").exists()


def test_skip_switch_gives_a_pure_python_install(tmp_path):
    env = dict(os.environ, EVIT_SKIP_CUDA_BUILD="1")
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w",
                          str(tmp_path), str(ROOT)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    wheel = next(tmp_path.glob("evit_kernels-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "evit_kernels/patch.py" in names
    assert not [n for n in names if n.endswith(".so")]


def test_skip_reason_names_the_cause(monkeypatch):
    setup = _setup_module()
    monkeypatch.setattr(os, "environ", dict(os.environ))  # the check exports CUDA_HOME / TORCH_CUDA_ARCH_LIST
    monkeypatch.setenv("EVIT_SKIP_CUDA_BUILD", "1")
    assert "EVIT_SKIP_CUDA_BUILD" in setup.cuda_skip_reason()
    monkeypatch.delenv("EVIT_SKIP_CUDA_BUILD")
    reason = setup.cuda_skip_reason()
    if torch.version.cuda is None:
        assert "CPU-only" in reason
    elif shutil.which("nvcc") or os.environ.get("CUDA_HOME"):
        assert reason is None and os.environ["TORCH_CUDA_ARCH_LIST"]
