"""Which backend measured fastest, per GPU model, op and shape class: the committed table
``evit_kernels/measured_backends.json`` that the automatic choice reads (:func:`evit_kernels.dispatch.choose`).

A GPU pass (``benchmarks/gpu_pass.sh``) times every backend on every distinct op call of the released models and
checks each against the reference (``released_ops.json``); ``benchmarks/record_measured.py`` folds a pass whose
tests all passed into this table. Its layout::

    {"<torch.cuda.get_device_name()>": {"commit": "...", "results": "<the pass's folder>",
                                         "ops": {"<op>": {"<OpArgs.shape_class()>": "<backend>"}}}}

A shape class absent from the table, a GPU absent from it, and CPU tensors all get the reference: a kernel runs
automatically only where it passed its tests and measured faster on that GPU model.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch

TABLE = Path(__file__).with_name("measured_backends.json")


@functools.cache
def table() -> dict[str, dict]:
    return json.loads(TABLE.read_text())


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def gpu_name(device: torch.device | None = None) -> str | None:
    """The GPU model of ``device`` (default: the current CUDA device), or None when it is not a CUDA device."""
    if (device is not None and device.type != "cuda") or not torch.cuda.is_available():
        return None
    index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
    return _device_name(index)


def fastest(args: Any) -> str | None:
    """The backend measured fastest for ``args``'s shape class on its GPU model, or None if never measured."""
    gpu = gpu_name(args.tensors()[0].device)
    choices = table().get(gpu, {}).get("ops", {}).get(args.op) if gpu else None
    return choices.get(args.shape_class()) if choices else None


def shape_classes(op: str, backend: str, gpu: str | None) -> list[str]:
    """The shape classes of ``op`` for which ``backend`` measured fastest on GPU model ``gpu``."""
    choices = table().get(gpu, {}).get("ops", {}).get(op, {}) if gpu else {}
    return [shape for shape, chosen in choices.items() if chosen == backend]
