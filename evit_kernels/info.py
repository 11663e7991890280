"""`evit_kernels.info()`: what this installation can do here, and why not where it cannot."""

from __future__ import annotations

import platform
from typing import Any

import torch

import evit_kernels
from evit_kernels import _extension, dispatch


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def info() -> dict[str, Any]:
    """Versions, GPU, the compiled extension, and for each op which backends can run now (or why not)."""
    gpu = None
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        gpu = {"name": torch.cuda.get_device_name(), "capability": f"{major}.{minor}"}
    ext_error = _extension.load_error()
    return {
        "evit_kernels": evit_kernels.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda": torch.version.cuda,
        "gpu": gpu,
        "extension": {
            "built": ext_error is None,
            "reason": ext_error,
            "archs": _extension.built_archs(),
            "cuda_version": (None if ext_error else
                             "{}.{}".format(*divmod(torch.ops.evit.cuda_build_version() // 10, 100))),
        },
        "ops": {op: dispatch.status(op) for op in dispatch.ops()},
    }


def format_info(report: dict[str, Any]) -> str:
    """``info()`` as the text `python -m evit_kernels info` prints."""
    gpu = report["gpu"]
    ext = report["extension"]
    lines = [
        f"evit_kernels {report['evit_kernels']}  (python {report['python']})",
        f"torch        {report['torch']}  (CUDA {report['cuda'] or 'none: CPU-only build'})",
        f"triton       {report['triton'] or 'not installed'}",
        f"GPU          {gpu['name'] + ' (sm ' + gpu['capability'] + ')' if gpu else 'none visible to torch'}",
        ("extension    evit_kernels._C built for sm " + ", ".join(ext["archs"]) + f" with CUDA {ext['cuda_version']}"
         if ext["built"] else f"extension    evit_kernels._C missing: {ext['reason']}"),
        "",
        f"backends per op (automatic choice takes the first usable in the order {', '.join(dispatch.PREFERENCE)}):",
    ]
    for op, backends in report["ops"].items():
        lines.append(f"  {op}")
        for name, reasons in backends.items():
            lines.append(f"    {name:<7}{'usable' if not reasons else 'no: ' + '; '.join(reasons)}")
    return "\n".join(lines)
