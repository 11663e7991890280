"""Backend choice for every evit op.

Each op registers one :class:`Backend` per implementation: ``torch`` (the eager reference, any device),
``triton`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``) and ``cuda`` (the compiled
``evit_kernels._C``). Every op takes one argument record (a frozen dataclass, as xformers' ``Inputs``); a backend
is declared by what it takes and says why it cannot run (:meth:`Backend.not_supported_reasons`), as in xformers.
The automatic choice runs a kernel only where it passed its tests and measured faster than the reference on this
GPU model for this shape class (:mod:`evit_kernels.measured`), the reference elsewhere, and logs once why it fell
back. An explicit request (``backend=`` or ``EVIT_BACKEND``) that cannot be met raises with every reason.
"experimental" takes the first usable backend in :data:`PREFERENCE`, measured or not (for testing and measuring
kernels on a new GPU: each kernel where it takes the inputs, the reference elsewhere).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd import forward_ad

from evit_kernels import _extension, measured

log = logging.getLogger("evit_kernels")

PREFERENCE = ("cuda", "triton", "torch")
"""Backend names in the order "experimental" tries them: a kernel before the reference, and the hand-written CUDA
kernel before the Triton one. An order, not a measurement ("auto" follows the measurements)."""
CHOICES = ("auto", "experimental", *PREFERENCE)
"""What a backend request may say: a backend's name, or how to choose one."""


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run these inputs."""


def environment_reasons(name: str) -> list[str]:
    """Why backend ``name`` cannot run on this machine at all (empty when it can)."""
    if name not in PREFERENCE:
        raise ValueError(f"unknown backend {name!r}; expected one of {PREFERENCE}")
    reasons = list(_process_reasons(name))
    if (name == "triton" and not _gpu_visible() and os.environ.get("TRITON_INTERPRET") != "1"
            and not _PLANNING):
        reasons.append("no CUDA GPU is visible to torch (CPU tensors need TRITON_INTERPRET=1)")
    return reasons


@functools.cache
def _gpu_visible() -> bool:
    """Whether torch sees a CUDA GPU (asked once: it cannot change while the process runs)."""
    return torch.cuda.is_available()


@functools.cache
def _process_reasons(name: str) -> tuple[str, ...]:
    """What keeps backend ``name`` from running that cannot change while the process runs (looked up once: it is
    asked on every op call): the extension's load, triton's import, a GPU for the CUDA kernels."""
    reasons = []
    if name == "cuda":
        if _extension.load_error() is not None:
            reasons.append(f"evit_kernels._C is not available: {_extension.load_error()}")
        if not _gpu_visible():
            reasons.append("no CUDA GPU is visible to torch")
    elif name == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            reasons.append(f"triton cannot be imported: {exc}")
    return tuple(reasons)


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""The dtypes every kernel of this package takes (float64 runs on the reference)."""


def span(t: torch.Tensor) -> int:
    """How many elements ``t`` spans in memory from its first one: every offset a kernel forms is below it."""
    if t.is_contiguous() and t.numel():  # the common case, without a walk over the sizes (asked on every op call)
        return t.numel()
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))


def fits_int32(t: torch.Tensor) -> bool:
    """Whether every element offset of ``t`` (through its strides) fits the kernels' 32-bit indexing."""
    return t.numel() < 2**31 and span(t) < 2**31


def device_reasons(name: str, tensor: torch.Tensor) -> list[str]:
    """Why backend ``name`` cannot take ``tensor``'s device (the kernels need CUDA tensors; Triton's interpreter
    also takes CPU ones)."""
    if name == "torch" or tensor.device.type == "cuda":
        return []
    if name == "triton" and tensor.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return []
    if name == "triton" and tensor.device.type == "meta" and _PLANNING:
        return []
    return [f"tensors on {tensor.device.type} (the {name} kernels need CUDA tensors)"]


@dataclass(frozen=True)
class Backend:
    """One implementation of one op, declared by what it takes.

    ``forward`` and ``reasons`` take the op's argument record (:class:`evit_kernels.ops._library.OpArgs`);
    ``reasons`` lists what is particular to this implementation (head dims, kernel sizes, channel limits). What
    every kernel shares is checked from the declaration: the machine (:func:`environment_reasons`), the tensors'
    device, ``dtypes`` (every tensor's), and with ``int32_offsets`` that every input and the output fit 32-bit
    offsets. ``backward``, when given, computes this implementation's gradients from (record, grad_out) as a
    dict by field name; without it the gradient is the torch backend's (its ``backward``, else the reference's
    vector-Jacobian product).
    """

    name: str
    forward: Callable[[Any], Any]
    reasons: Callable[[Any], list[str]] = lambda args: []
    backward: Callable[[Any, Any], dict[str, Any]] | None = None
    dtypes: tuple[torch.dtype, ...] = KERNEL_DTYPES
    int32_offsets: bool = True

    def not_supported_reasons(self, args: Any) -> list[str]:
        """Why this backend cannot run ``args`` here: the machine first (input checks only run where the backend
        can run at all: they may import its kernels), then :meth:`input_reasons`."""
        return environment_reasons(self.name) or self.input_reasons(args)

    def input_reasons(self, args: Any) -> list[str]:
        """Why this backend cannot take ``args``, whatever the machine: the declared checks, then ``reasons``."""
        tensors = args.tensors()
        reasons = device_reasons(self.name, tensors[0])
        dtypes = sorted({str(t.dtype) for t in tensors if t.dtype not in self.dtypes})
        if dtypes:
            *rest, last = [str(d).removeprefix("torch.") for d in self.dtypes]
            reasons.append(f"{', '.join(dtypes)} inputs (the {self.name} kernels take {', '.join(rest)} and {last})")
        if self.int32_offsets and (args.output_numel() >= 2**31 or not all(fits_int32(t) for t in tensors)):
            reasons.append("a tensor spanning 2^31 elements or more (the kernels index with 32 bits)")
        if self.name != "torch" and _has_tangents(tensors):
            reasons.append("forward-mode AD tangents (the kernels have no JVP; the reference's ops carry them)")
        return reasons + self.reasons(args)


def _has_tangents(tensors: list[torch.Tensor]) -> bool:
    """Whether any of ``tensors`` carries a forward-mode AD tangent (only looked for while a dual level is open:
    torch.autograd.forward_ad keeps no public flag for that)."""
    return forward_ad._current_level >= 0 and any(forward_ad.unpack_dual(t).tangent is not None for t in tensors)


_REGISTRY: dict[str, dict[str, Backend]] = {}
_LOGGED: set[tuple[str, str]] = set()
_OBSERVERS: list[Callable[[Backend, Any], None]] = []


def register(op: str, backend: Backend) -> None:
    if backend.name not in PREFERENCE:
        raise ValueError(f"unknown backend {backend.name!r}; expected one of {PREFERENCE}")
    _REGISTRY.setdefault(op, {})[backend.name] = backend


def ops() -> list[str]:
    return sorted(_REGISTRY)


def get(op: str, name: str) -> Backend:
    return _REGISTRY[op][name]


def requested(op: str, backend: str = "auto") -> str:
    """The backend asked for ``op``: ``backend`` unless it is "auto", then ``EVIT_BACKEND``, then "auto".

    Either names one backend for every op ("triton") or lists some ops ("relu_linear_attention=triton,
    conv_bn_act=torch"), the others staying automatic.
    """
    choice = backend if backend != "auto" else os.environ.get("EVIT_BACKEND", "auto") or "auto"
    if "=" in choice:
        return _per_op(choice).get(op, "auto")
    _check_choice(choice)
    return choice


def check_request(request: object) -> str:
    """``request`` itself if it is a backend request this module understands ("auto", "experimental", a backend
    name, or "op=backend, ..."), else a TypeError or ValueError that says what is accepted."""
    if not isinstance(request, str):
        raise TypeError(f"backend must be a string ({', '.join(CHOICES)}, or 'op=backend, ...'), got {request!r}")
    if "=" in request:
        _per_op(request)
    else:
        _check_choice(request)
    return request


def _check_choice(choice: str) -> None:
    if choice not in CHOICES:
        raise ValueError(f"unknown backend {choice!r}; expected one of {CHOICES}")


@functools.lru_cache(maxsize=16)
def _per_op(request: str) -> dict[str, str]:
    """``"op=backend, op=backend"`` as a dict, checked once per request string (this runs on every op call)."""
    per_op = {}
    for item in request.split(","):
        op, equals, choice = (part.strip() for part in item.partition("="))
        if not equals:
            raise ValueError(f"backend request {request!r}: {item.strip()!r} is not op=backend (name one backend for "
                             "every op, or list op=backend pairs)")
        if op not in _REGISTRY:
            raise ValueError(f"backend request {request!r}: unknown op {op!r}; expected one of {ops()}")
        _check_choice(choice)
        per_op[op] = choice
    return per_op


def status(op: str) -> dict[str, list[str]]:
    """For each backend name: the reasons it cannot be chosen automatically here (empty = usable for the shape
    classes where it measured fastest on this GPU model)."""
    out = {}
    gpu = measured.gpu_name()
    for name in PREFERENCE:
        if name not in _REGISTRY[op]:
            out[name] = [f"no {name} implementation of {op} yet"]
            continue
        reasons = environment_reasons(name)
        if name != "torch" and not measured.shape_classes(op, name, gpu):
            reasons.append(f"not measured faster than the reference for any shape on {gpu or 'this machine'} "
                           "(runs when requested by name or with experimental)")
        out[name] = reasons
    return out


def choose(args: Any, backend: str = "auto") -> Backend:
    """The backend that runs the op of argument record ``args`` (see the module docstring for the rules)."""
    op = args.op
    choice = requested(op, backend)
    backends = _REGISTRY[op]
    if choice not in ("auto", "experimental"):
        chosen = backends.get(choice)
        reasons = [f"no {choice} implementation of {op} yet"] if chosen is None else chosen.not_supported_reasons(args)
        if reasons:
            raise BackendUnavailable(f"{op}: backend {choice!r} was requested but cannot run: " + "; ".join(reasons))
        return chosen
    names = PREFERENCE if choice == "experimental" else (measured.fastest(args) or "torch", "torch")
    passed_over = []
    for name in dict.fromkeys(names):
        candidate = backends.get(name)
        if candidate is None:
            continue
        reasons = candidate.not_supported_reasons(args)
        if not reasons:
            if passed_over:
                log_once(op, f"{op}: using {name}; " + "; ".join(passed_over))
            return candidate
        passed_over.append(f"{name} skipped: " + ", ".join(reasons))
    raise BackendUnavailable(f"{op}: no backend can run these inputs: " + "; ".join(passed_over))


def call(chosen: Backend, args: Any) -> Any:
    """Run ``chosen`` on the argument record ``args``. The reference runs as the plain PyTorch ops it is made of:
    autograd, autocast and torch.compile see through it (the compiler can fuse it), and no custom-op call is paid
    per layer. A kernel runs through the op's ``torch.library`` op (``torch.ops.evit.<op>``, which takes the
    record's fields and the backend name last), so torch.compile and export see one node with its fake
    implementation and autograd; where none of these looks (no gradient to record, no compiler or tracer
    running) the kernel is launched directly, saving the custom op's dispatch on every call."""
    for observe in _OBSERVERS:
        observe(chosen, args)
    if chosen.name == "torch" or _PLANNING:  # planning: meta tensors would run the op's fake, not its launcher
        return chosen.forward(args)
    if _nothing_records(args):
        return run_kernel(chosen, args)
    return getattr(torch.ops.evit, args.op)(*args.fields(), chosen.name)


def run_kernel(chosen: Backend, args: Any) -> Any:
    """A kernel backend's forward on ``args``, or the empty output where there is nothing to compute (no kernel is
    launched on an empty grid). What the ``torch.library`` op runs, and :func:`call` where nothing records."""
    return args.new_output() if args.output_numel() == 0 else chosen.forward(args)


def _nothing_records(args: Any) -> bool:
    """Whether a kernel call needs no custom-op node: no gradient would be recorded, and neither torch.compile nor
    a tracer (torch.jit, the ONNX exporter) is running. (Forward-mode tangents never reach a kernel:
    :meth:`Backend.input_reasons`.)"""
    if torch.is_grad_enabled() and any(t.requires_grad for t in args.tensors()):
        return False
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing())


def run(args: Any, backend: str = "auto") -> Any:
    """:func:`call` on the backend :func:`choose` picks."""
    return call(choose(args, backend), args)


_PLANNING: list[bool] = []


@contextlib.contextmanager
def planning() -> Iterator[None]:
    """Inside the block the Triton backends take meta tensors, with or without a GPU: for running a model at full
    size without memory while the kernel launches are recorded instead of run (:mod:`evit_kernels.predict`)."""
    _PLANNING.append(True)
    try:
        yield
    finally:
        _PLANNING.pop()


@contextlib.contextmanager
def observing(observe: Callable[[Backend, Any], None]) -> Iterator[None]:
    """Inside the block, ``observe(backend, args)`` is called before each evit op call runs, with the backend that
    runs it and its argument record. Code compiled by torch.compile before the block does not re-enter Python and
    is not observed."""
    _OBSERVERS.append(observe)
    try:
        yield
    finally:
        _OBSERVERS.remove(observe)


@contextlib.contextmanager
def recording() -> Iterator[list[tuple[str, str]]]:
    """Record, as (op, backend) pairs in call order, which backend runs each evit op called inside the block: e.g.
    to check that a patched model runs the kernels and not the reference, or that a fused module took its fused
    path (its fallback to the original layers gives the same numbers)."""
    runs: list[tuple[str, str]] = []
    with observing(lambda chosen, args: runs.append((args.op, chosen.name))):
        yield runs


def differentiable_backward(op: str, backend: str) -> bool:
    """Whether a backward of ``op`` that ran forward on ``backend`` must be differentiable itself: under
    ``create_graph=True`` (gradient penalties, higher-order gradients) grad mode is on inside the backward, and a
    kernel's gradients would carry no graph, so the second-order terms would silently be zero. The backward then
    runs the reference, made of differentiable PyTorch ops, and says so once."""
    if backend == "torch" or not torch.is_grad_enabled():
        return False
    log_once(op, f"{op}: create_graph=True: the backward runs the differentiable reference instead of the "
                 f"{backend} kernel")
    return True


def log_once(op: str, message: str) -> None:
    """Log ``message`` about ``op`` at INFO level, the first time only (and never while torch.compile traces)."""
    if torch.compiler.is_compiling() or (op, message) in _LOGGED:
        return
    _LOGGED.add((op, message))
    log.info(message)
