"""Builds evit_kernels, with the CUDA extension evit_kernels._C when a CUDA toolchain and a CUDA torch exist.

Install with `pip install --no-build-isolation .` so the extension compiles against the torch you have.
The CUDA build is optional: when it cannot happen the install still succeeds and says why.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import tempfile

from setuptools import find_packages, setup

DEFAULT_ARCHS = "8.0;9.0"  # A100 and H100; override with TORCH_CUDA_ARCH_LIST


def find_cuda_home() -> str | None:
    """The CUDA toolkit root: $CUDA_HOME / $CUDA_PATH, else the toolkit behind the nvcc on PATH.

    nvcc may be a wrapper script (e.g. /usr/local/bin/nvcc exec'ing the real one), from which torch would guess
    /usr/local and fail to link; so when the directory above nvcc has no CUDA headers, nvcc is asked where its
    toolkit is (`nvcc --dryrun` prints TOP=<bin>/..).
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "/usr/local/cuda" if os.path.exists("/usr/local/cuda/bin/nvcc") else None
    root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
        return root
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cu")
        open(src, "w").close()
        out = subprocess.run([nvcc, "--dryrun", "-c", src, "-o", os.path.join(tmp, "probe.o")],
                             capture_output=True, text=True)
    match = re.search(r"^#\$ TOP=(.+)$", out.stderr + out.stdout, re.MULTILINE)
    return os.path.realpath(match.group(1).strip()) if match else None


def cuda_skip_reason() -> str | None:
    """None when the CUDA extension can be built, else why not."""
    if os.environ.get("EVIT_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return "EVIT_SKIP_CUDA_BUILD is set"
    try:
        import torch
    except ImportError:
        return "torch is not importable (install torch first, then this package with --no-build-isolation)"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    cuda_home = find_cuda_home()
    if cuda_home is None or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return "no CUDA toolkit found (no nvcc on PATH and CUDA_HOME unset)"
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # Without a list torch asks the GPU for its arch, and crashes where there is none.
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
    return None


def extension_kwargs() -> dict:
    reason = cuda_skip_reason()
    if reason is not None:
        print(f"evit_kernels: skipping the CUDA extension evit_kernels._C: {reason}", flush=True)
        return {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    print(f"evit_kernels: building evit_kernels._C with CUDA_HOME={os.environ['CUDA_HOME']} "
          f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} MAX_JOBS={os.environ.get('MAX_JOBS', 'all')}",
          flush=True)
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    ext = CUDAExtension(
        name="evit_kernels._C",
        sources=sources,
        # The C++ standard is left to torch (C++17 up to 2.x, C++20 from 2.14): its headers need their own.
        # No --use_fast_math: it would swap expf, erff and division for approximations, and the kernels' softmax
        # and activations must match the reference (they are memory-bound, so the exact forms cost nothing).
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


if __name__ == "__main__":  # setuptools' build backend runs this file as __main__; tests import its helpers
    setup(
        name="evit_kernels",
        version="0.1.0",
        description="Fused Triton and CUDA kernels and drop-in modules for EfficientViT models",
        packages=find_packages(include=["evit_kernels", "evit_kernels.*"]),
        package_data={"evit_kernels": ["measured_backends.json"]},
        python_requires=">=3.10",
        install_requires=["torch>=2.5"],
        extras_require={
            "models": ["timm>=1.0", "efficientsam", "diffusers", "peft"],
            "test": ["pytest", "pytest-benchmark", "hypothesis", "onnx", "onnxruntime", "timm>=1.0", "efficientsam",
                     "diffusers", "peft"],
        },
        entry_points={"console_scripts": ["evit-kernels=evit_kernels.__main__:main"]},
        **extension_kwargs(),
    )
