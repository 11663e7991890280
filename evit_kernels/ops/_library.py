"""What every evit op shares: input dtype policy and the autograd of reference-only ops."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree

LOW_PRECISION = (torch.float16, torch.bfloat16)
FLOATING = (torch.float32, torch.float64) + LOW_PRECISION


def autocast_inputs(x: torch.Tensor, *tensors: Any) -> tuple[Any, ...]:
    """Cast ``x`` and ``tensors`` (tensors, lists of tensors or None) to the autocast dtype when autocast is on
    for ``x``'s device, as autocast would for the convolutions and matmuls these ops replace; else return
    them unchanged. Custom ops are invisible to autocast, so every op calls this before dispatching."""
    device_type = x.device.type
    if device_type == "meta" or not torch.is_autocast_enabled(device_type):  # autocast has no meta device
        return (x, *tensors)
    dtype = torch.get_autocast_dtype(device_type)
    return pytree.tree_map_only(torch.Tensor, lambda t: t.to(dtype) if t.is_floating_point() else t, (x, *tensors))


def autocast_off(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast disabled for ``x``'s device (nothing to disable on meta tensors, which autocast does not know)."""
    return contextlib.nullcontext() if x.device.type == "meta" else torch.autocast(x.device.type, enabled=False)


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


def register_reference_autograd(qualname: str, reference: Callable[..., torch.Tensor]) -> None:
    """Give ``qualname`` a backward that recomputes ``reference`` and takes its vector-Jacobian product.

    Correct by construction, for ops whose kernels have no backward of their own: the gradient is the
    reference's whichever backend ran the forward. The op takes ``reference``'s arguments followed by the name
    of the backend that runs it (every evit op does), which the reference is not given. The arguments may include
    tensors, lists of tensors, None and plain values; gradients flow to every floating-point tensor among them.
    """

    def setup_context(ctx, inputs, output):
        leaves, ctx.spec = pytree.tree_flatten(list(inputs))
        ctx.is_tensor = [isinstance(v, torch.Tensor) for v in leaves]
        ctx.constants = [None if t else v for v, t in zip(leaves, ctx.is_tensor)]
        ctx.save_for_backward(*[v for v, t in zip(leaves, ctx.is_tensor) if t])

    def backward(ctx, grad):
        saved = iter(ctx.saved_tensors)
        leaves = [next(saved) if t else c for t, c in zip(ctx.is_tensor, ctx.constants)]
        wrt = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor) and v.is_floating_point()]

        def fn(*diff):
            full = list(leaves)
            for i, v in zip(wrt, diff):
                full[i] = v
            return reference(*pytree.tree_unflatten(full, ctx.spec)[:-1])  # all but the backend name

        _, vjp = torch.func.vjp(fn, *[leaves[i] for i in wrt])
        grads_by_leaf = dict(zip(wrt, vjp(grad)))
        grads = pytree.tree_unflatten([grads_by_leaf.get(i) for i in range(len(leaves))], ctx.spec)
        # A plain-value argument (an int list, say) takes None, not a list of Nones.
        return tuple(g if isinstance(a, torch.Tensor) or _holds_tensor(a) else None
                     for g, a in zip(grads, pytree.tree_unflatten(leaves, ctx.spec)))

    torch.library.register_autograd(qualname, backward, setup_context=setup_context)


def _holds_tensor(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value)
