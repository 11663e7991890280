"""Loads the optional compiled extension ``evit_kernels._C`` and remembers why it is missing."""

from __future__ import annotations

import importlib

_ERROR: str | None = None
_MODULE = None


def _load() -> None:
    global _ERROR, _MODULE
    try:
        _MODULE = importlib.import_module("evit_kernels._C")
    except ImportError as exc:  # not built (EVIT_SKIP_CUDA_BUILD, no toolkit, CPU torch) or built for another torch
        _ERROR = str(exc) or type(exc).__name__
        if "No module named" in _ERROR:
            _ERROR = "not built (install with a CUDA build of torch and nvcc; see the README)"


def load_error() -> str | None:
    """None when ``evit_kernels._C`` is loaded, else why it is not."""
    return _ERROR


def built_archs() -> list[str]:
    """The CUDA architectures the extension was compiled for, e.g. ['8.0', '9.0'] (empty if not built)."""
    if _MODULE is None:
        return []
    import torch

    return [f"{a // 100}.{a % 100 // 10}" for a in torch.ops.evit.cuda_build_archs()]


_load()
