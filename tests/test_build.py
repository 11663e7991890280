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


def test_extension_state_is_consistent():
    if _extension.load_error() is None:
        assert _extension.built_archs(), "a loaded extension must report the archs it was built for"
    else:
        assert _extension.built_archs() == []


@pytest.mark.parametrize("failure, explained", [
    ("No module named 'evit_kernels._C'", "not built (install with a CUDA build of torch and nvcc; see the README)"),
    ("_C.so: undefined symbol: _ZN3c104cuda", "_C.so: undefined symbol: _ZN3c104cuda"),  # built for another torch
])
def test_missing_extension_is_explained(monkeypatch, failure, explained):
    def fail(name):
        raise ImportError(failure)

    monkeypatch.setattr(_extension, "_ERROR", None)
    monkeypatch.setattr(_extension, "_MODULE", None)
    monkeypatch.setattr(_extension.importlib, "import_module", fail)
    _extension._load()
    assert _extension.load_error() == explained
    assert _extension.built_archs() == []


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


def test_skip_reason_names_the_cause(monkeypatch, tmp_path):
    """Each cause in turn, whatever this machine has: the switch, a CPU-only torch, no toolkit, a toolkit."""
    setup = _setup_module()
    monkeypatch.setattr(os, "environ", dict(os.environ))  # the check exports CUDA_HOME / TORCH_CUDA_ARCH_LIST
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setenv("EVIT_SKIP_CUDA_BUILD", "1")
    assert setup.cuda_skip_reason() == "EVIT_SKIP_CUDA_BUILD is set"
    monkeypatch.delenv("EVIT_SKIP_CUDA_BUILD")
    monkeypatch.setattr(torch.version, "cuda", None)
    assert setup.cuda_skip_reason() == f"torch {torch.__version__} is a CPU-only build"
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(setup, "find_cuda_home", lambda: None)
    assert setup.cuda_skip_reason() == "no CUDA toolkit found (no nvcc on PATH and CUDA_HOME unset)"
    monkeypatch.setattr(setup, "find_cuda_home", lambda: str(tmp_path))
    assert setup.cuda_skip_reason() == "no CUDA toolkit found (no nvcc on PATH and CUDA_HOME unset)"  # no bin/nvcc
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").touch()
    assert setup.cuda_skip_reason() is None
    assert os.environ["CUDA_HOME"] == str(tmp_path)
    gpu = torch.cuda.is_available() and "{}.{}".format(*torch.cuda.get_device_capability())
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == (gpu or "8.0;9.0")
