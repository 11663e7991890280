"""What every evit op shares: the argument record base, the op registration (schema, fake, autograd, torch
backend) and the input dtype policy."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from evit_kernels import dispatch

LOW_PRECISION = (torch.float16, torch.bfloat16)
FLOATING = (torch.float32, torch.float64) + LOW_PRECISION


def autocast_inputs(x: torch.Tensor, *tensors: Any) -> tuple[Any, ...]:
    """Cast ``x`` and ``tensors`` (tensors, lists of tensors or None) to the autocast dtype when autocast is on
    for ``x``'s device, as autocast would for the convolutions and matmuls these ops replace; else return
    them unchanged. Custom ops are invisible to autocast, so every op calls this before dispatching. Meta tensors
    stand for a GPU's (:mod:`evit_kernels.predict` runs models on them): autocast has no meta device, so they follow
    CUDA's autocast state."""
    device_type = _autocast_device(x)
    if not torch.is_autocast_enabled(device_type):
        return (x, *tensors)
    dtype = torch.get_autocast_dtype(device_type)
    cast: dict[int, torch.Tensor] = {}  # one tensor given twice is cast once

    def to_dtype(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in cast:
            cast[id(t)] = t.to(dtype) if t.is_floating_point() else t
        return cast[id(t)]

    return pytree.tree_map_only(torch.Tensor, to_dtype, (x, *tensors))


def _autocast_device(x: torch.Tensor) -> str:
    return "cuda" if x.device.type == "meta" else x.device.type


def autocast_off(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast disabled for ``x``'s device (CUDA's for meta tensors, as in :func:`autocast_inputs`)."""
    return torch.autocast(_autocast_device(x), enabled=False)


def check_floating_same_dtype(op: str, x: torch.Tensor, **tensors: Any) -> None:
    """Raise a clear error unless ``x`` is a supported floating dtype and every named tensor matches it."""
    if x.dtype not in FLOATING:
        raise TypeError(f"{op}: input dtype {x.dtype} is not supported; expected one of {FLOATING}")
    for name, value in tensors.items():
        for t in value if isinstance(value, (list, tuple)) else [value]:
            if t is not None and t.dtype != x.dtype:
                raise TypeError(
                    f"{op}: {name} has dtype {t.dtype} but the input has {x.dtype}; cast the module "
                    f"(module.to({x.dtype})) or run under torch.autocast")
            if t is not None and t.device != x.device:
                raise ValueError(f"{op}: {name} is on {t.device} but the input is on {x.device}")


class OpArgs:
    """Base of the argument records, one frozen dataclass per op: built by the op's function (checked, then cast
    by :meth:`cast_and_checked`), then handed whole to the reference, the fake implementation, every backend's
    checks and kernels, and the autograd. The fields, in order, are the ``torch.library`` op's arguments (its
    schema is derived from their annotations); ``op`` names the op."""

    op: ClassVar[str]

    def fields(self) -> tuple:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def cast_and_checked(self, keep: tuple[str, ...] = ()) -> OpArgs:
        """This record with its tensor fields (but those named in ``keep``) cast to the autocast dtype when autocast
        is on, as autocast would for the convolutions and matmuls the op replaces, then checked to be of one
        supported floating dtype on one device (:func:`check_floating_same_dtype`). Custom ops are invisible to
        autocast, so every op's function prepares its record this way."""
        names = [f.name for f in dataclasses.fields(self)
                 if "Tensor" in f.type and f.name not in keep and getattr(self, f.name) is not None]
        cast = dict(zip(names, autocast_inputs(*(getattr(self, name) for name in names)), strict=True))
        first, *rest = names
        check_floating_same_dtype(self.op, cast[first], **{name: cast[name] for name in rest})
        if all(value is getattr(self, name) for name, value in cast.items()):
            return self  # nothing cast (autocast off): no new record
        return dataclasses.replace(self, **cast)

    def tensors(self) -> tuple[Tensor, ...]:
        """Every tensor among the fields (lists flattened, absent ones skipped), the first argument first."""
        # Fields are tensors, lists of tensors (or None) and constants: one level to flatten. Asked for several
        # times per op call (checks, dtype, output), it is flattened once per record: a frozen record's fields
        # never change (``dataclasses.replace`` makes a new record).
        cached = self.__dict__.get("_tensors")
        if cached is None:
            out = []
            for value in self.fields():
                if isinstance(value, Tensor):
                    out.append(value)
                elif isinstance(value, (list, tuple)):
                    out.extend(t for t in value if isinstance(t, Tensor))
            cached = self.__dict__["_tensors"] = tuple(out)
        return cached

    def output_shape(self) -> list[int]:
        raise NotImplementedError

    def output_layout(self) -> torch.memory_format:
        return torch.contiguous_format

    def output_numel(self) -> int:
        return math.prod(self.output_shape())

    def compute_dtype(self) -> torch.dtype:
        """The dtype the op computes in: its inputs' (one dtype, :meth:`cast_and_checked`)."""
        return self.tensors()[0].dtype

    def output_dtype(self) -> torch.dtype:
        return self.compute_dtype()

    def new_output(self, layout: torch.memory_format | None = None) -> Tensor:
        """The op's output, uninitialised: shape, dtype, device and layout as every backend returns it (``layout``,
        when given, in place of the op's: for a caller that consumes the output itself)."""
        return torch.empty(self.output_shape(), dtype=self.output_dtype(), device=self.tensors()[0].device,
                           memory_format=layout or self.output_layout())

    def shape_class(self) -> str:
        """What a measured choice of backend is keyed by (:mod:`evit_kernels.measured`): every field, tensors by
        dtype, shape and layout ("c" contiguous, "cl" channels_last, "s" other strides), with the leading (batch)
        size of the tensors shaped like the first one replaced by its bucket: <=1, <=4, <=16, <=64, <=256, >256."""
        first = self.tensors()[0]

        def describe(value: Any) -> str:
            if isinstance(value, (list, tuple)):
                return "[" + ",".join(map(describe, value)) + "]"
            if not isinstance(value, Tensor):
                return repr(value)
            shape = [str(n) for n in value.shape]
            if value.dim() == first.dim() and value.shape[0] == first.shape[0]:
                shape[0] = _batch_bucket(value.shape[0])
            layout = ("c" if value.is_contiguous() else
                      "cl" if value.dim() == 4 and value.is_contiguous(memory_format=torch.channels_last) else "s")
            return f"{str(value.dtype).removeprefix('torch.')}({'x'.join(shape)}){layout}"

        return " ".join(f"{f.name}={describe(getattr(self, f.name))}" for f in dataclasses.fields(self))


class AddsResidual(OpArgs):
    """Base of the records whose op adds an optional ``residual`` field last, as eager ``y + residual`` adds it:
    the residual is read as it is, never cast by autocast, and may be fp32 where the other inputs are fp16/bf16
    (an fp32 shortcut around a block autocast runs in low precision); the output then is fp32, the dtype eager's
    sum has, rounded once."""

    residual: Tensor | None

    def output_dtype(self) -> torch.dtype:
        # The residual has the compute dtype or fp32 (cast_and_checked): the sum's is the wider of the two, as
        # promotion gives (a plain comparison, which adds no op to a traced graph as torch.promote_types would).
        dtype = self.compute_dtype()
        return dtype if self.residual is None else max(dtype, self.residual.dtype, key=lambda d: d.itemsize)

    def cast_and_checked(self, keep: tuple[str, ...] = ()) -> OpArgs:
        checked = super().cast_and_checked((*keep, "residual"))
        dtype, device, residual = checked.compute_dtype(), checked.tensors()[0].device, checked.residual
        if residual is None:
            return checked
        if residual.dtype != dtype and not (dtype in LOW_PRECISION and residual.dtype == torch.float32):
            raise TypeError(f"{self.op}: residual has dtype {residual.dtype} but the input has {dtype}; the "
                            "residual is added as it is: of the input's dtype, or float32 with a float16/bfloat16 "
                            "input (the output is then float32)")
        if residual.device != device:
            raise ValueError(f"{self.op}: residual is on {residual.device} but the input is on {device}")
        return checked


class RoundsInput(OpArgs):
    """Base of the records whose op takes, under autocast, an fp32 ``x`` as it is where autocast would cast it to
    fp16/bf16, and rounds it to that dtype itself (the weights' dtype, the compute dtype): the same values as
    autocast's cast, which a kernel makes as it loads ``x`` instead of in a pass over ``x`` of its own (the first
    conv of a block whose input is an fp32 shortcut). Outside autocast every input has one dtype, as for every op.
    ``weight_field`` names the field whose dtype is the compute dtype."""

    weight_field: ClassVar[str]

    def compute_dtype(self) -> torch.dtype:
        return getattr(self, self.weight_field).dtype

    def cast_and_checked(self, keep: tuple[str, ...] = ()) -> OpArgs:
        x, device_type = self.x, _autocast_device(self.x)
        narrowed = (torch.is_autocast_enabled(device_type) and x.dtype == torch.float32
                    and torch.get_autocast_dtype(device_type) in LOW_PRECISION)
        if not narrowed:
            return super().cast_and_checked(keep)
        checked = super().cast_and_checked((*keep, "x"))  # x never cast: no pass over it before the op
        weight = getattr(checked, self.weight_field)
        if x.device != weight.device:
            raise ValueError(f"{self.op}: x is on {x.device} but {self.weight_field} is on {weight.device}")
        return checked

    def rounded_input(self) -> Tensor:
        """``x`` in the compute dtype (autocast's cast, for the code that does not round it on load)."""
        return self.x.to(self.compute_dtype())


BATCH_BUCKETS = (1, 4, 16, 64, 256)


def _batch_bucket(n: int) -> str:
    return next((f"<={b}" for b in BATCH_BUCKETS if n <= b), f">{BATCH_BUCKETS[-1]}")


_SCHEMA_TYPES = {"Tensor": "Tensor", "Tensor | None": "Tensor?", "list[Tensor]": "Tensor[]",
                 "list[Tensor | None]": "Tensor?[]", "int": "SymInt", "list[int]": "SymInt[]", "float": "float",
                 "str": "str", "str | None": "str?", "bool": "bool"}


def define_op(args_type: type[OpArgs], reference: Callable[[OpArgs], Tensor],
              reference_backward: Callable[[OpArgs, Tensor], dict[str, Any]] | None = None) -> None:
    """Register op ``evit::<args_type.op>`` with ``torch.library`` (schema from the record's fields plus the
    backend name, fake from :meth:`OpArgs.new_output`, autograd) and its torch backend with
    :mod:`evit_kernels.dispatch`.

    The gradient of a run on backend ``b`` is ``b``'s own ``backward`` when it has one (and the backward need not
    be differentiable, :func:`dispatch.differentiable_backward`), else ``reference_backward``, else the
    vector-Jacobian product of ``reference``: correct by construction for kernels without a backward."""
    name = args_type.op
    unknown = [f"{f.name}: {f.type}" for f in dataclasses.fields(args_type) if f.type not in _SCHEMA_TYPES]
    if unknown:  # the annotations are read as written, so record modules use `from __future__ import annotations`
        raise TypeError(f"{args_type.__name__}: no schema type for {unknown}; expected one of {list(_SCHEMA_TYPES)}")
    arguments = ", ".join(f"{_SCHEMA_TYPES[f.type]} {f.name}" for f in dataclasses.fields(args_type))

    def run(*values: Any) -> Tensor:
        return dispatch.run_kernel(dispatch.get(name, values[-1]), args_type(*values[:-1]))

    torch.library.custom_op(f"evit::{name}", run, mutates_args=(), schema=f"({arguments}, str backend) -> Tensor")
    torch.library.register_fake(f"evit::{name}", lambda *values: args_type(*values[:-1]).new_output())

    def setup_context(ctx, inputs, output):
        leaves, ctx.spec = pytree.tree_flatten(list(inputs[:-1]))
        ctx.backend = inputs[-1]
        ctx.is_tensor = [isinstance(v, Tensor) for v in leaves]
        ctx.constants = [None if t else v for v, t in zip(leaves, ctx.is_tensor)]
        ctx.save_for_backward(*[v for v, t in zip(leaves, ctx.is_tensor) if t])

    def backward(ctx, grad):
        saved = iter(ctx.saved_tensors)
        leaves = [next(saved) if t else c for t, c in zip(ctx.is_tensor, ctx.constants)]
        args = args_type(*pytree.tree_unflatten(leaves, ctx.spec))
        own = dispatch.get(name, ctx.backend).backward
        if own is not None and not dispatch.differentiable_backward(name, ctx.backend):
            grads = own(args, grad)
        elif reference_backward is not None:
            grads = reference_backward(args, grad)
        else:
            grads = _reference_vjp(reference, args_type, leaves, ctx.spec, grad)
        return (*(grads.get(f.name) for f in dataclasses.fields(args_type)), None)

    torch.library.register_autograd(f"evit::{name}", backward, setup_context=setup_context)
    dispatch.register(name, reference_backend(reference))


def reference_backend(reference: Callable[[OpArgs], Tensor]) -> dispatch.Backend:
    """The ``torch`` backend of an op: its reference, which takes every floating dtype and any size."""
    return dispatch.Backend("torch", reference, dtypes=FLOATING, int32_offsets=False)


def _reference_vjp(reference: Callable[[OpArgs], Tensor], args_type: type[OpArgs], leaves: list, spec,
                   grad: Tensor) -> dict[str, Any]:
    """The gradient of every floating-point tensor among the fields (tensors, lists of tensors or None), by field
    name: the vector-Jacobian product of ``reference``."""
    wrt = [i for i, v in enumerate(leaves) if isinstance(v, Tensor) and v.is_floating_point()]

    def fn(*diff):
        full = list(leaves)
        for i, v in zip(wrt, diff):
            full[i] = v
        return reference(args_type(*pytree.tree_unflatten(full, spec)))

    _, vjp = torch.func.vjp(fn, *[leaves[i] for i in wrt])
    grads_by_leaf = dict(zip(wrt, vjp(grad)))
    grads = pytree.tree_unflatten([grads_by_leaf.get(i) for i in range(len(leaves))], spec)
    values = pytree.tree_unflatten(leaves, spec)
    # A plain-value field (an int list, say) takes None, not a list of Nones.
    return {f.name: g for f, g, v in zip(dataclasses.fields(args_type), grads, values)
            if isinstance(v, Tensor) or _holds_tensor(v)}


def _holds_tensor(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value)
