"""What every drop-in module shares: sharing the original's state and giving it back."""

from __future__ import annotations

import sys

import torch
from torch import nn

from evit_kernels import dispatch


class Unsupported(ValueError):
    """The module matched a patch rule but has a configuration the fused module cannot compute exactly."""


class FusedModule(nn.Module):
    """Base of the ``Fused<Original>`` modules.

    It adopts every child, parameter and buffer of ``original`` under the same names (the same objects), so
    ``state_dict`` keys and shapes are unchanged and an optimizer built before patching keeps training it.
    ``original`` itself is kept out of the module tree, for :meth:`restore`. ``backend`` selects the
    implementation ("auto", "experimental", "torch", "triton", "cuda", or per op; see :mod:`evit_kernels.dispatch`).
    """

    patch_inside = True
    """Whether :func:`evit_kernels.patch` also swaps this module's children (False when it computes them)."""

    def __call__(self, *args, **kwargs):
        if torch.jit.is_tracing():
            # torch.jit.trace and the legacy ONNX exporter record tensor ops as they run and would bake the fused
            # path's shape arithmetic and scratch buffers into constants: they record the original module instead.
            return self.restore()(*args, **kwargs)
        return super().__call__(*args, **kwargs)

    def __prepare_scriptable__(self) -> nn.Module:
        """torch.jit.script compiles the original module (same parameters and numbers) in place of this one."""
        return self.restore()

    @property
    def backend(self) -> str:
        return self.__dict__["_evit_backend"]

    @backend.setter
    def backend(self, request: str) -> None:
        self.__dict__["_evit_backend"] = dispatch.check_request(request)  # a bad request fails here, not mid-forward

    def __init__(self, original: nn.Module, backend: str = "auto"):
        super().__init__()
        if "timm" in sys.modules:  # timm's FX feature extraction keeps fused modules whole (leaf call_module nodes)
            from timm.layers import register_notrace_module

            register_notrace_module(type(self))
        self.__dict__["_evit_original"] = original
        self.backend = backend
        self.training = original.training
        for name, child in original._modules.items():
            self._modules[name] = child
        for name, param in original._parameters.items():
            self._parameters[name] = param
        for name, buf in original._buffers.items():
            self._buffers[name] = buf
        self._non_persistent_buffers_set = set(original._non_persistent_buffers_set)

    def _bind_roles(self, roles: dict[str, tuple[str, ...]], block: str) -> None:
        """For containers whose libraries name the same child differently (timm ``conv`` / Cream ``c``): bind each
        role to the first of its names present, and refuse a child that no role takes."""
        self._role_names = {role: next((n for n in names if n in self._modules), None)
                            for role, names in roles.items()}
        unknown = set(self._modules) - set(self._role_names.values())
        if unknown:
            raise Unsupported(f"{type(self.original).__qualname__} has children {sorted(unknown)} that a {block} "
                              "block does not have")

    def _child(self, role: str) -> nn.Module | None:
        """The live child bound to ``role`` (looked up on each call: SyncBatchNorm conversion and ``fold_bn`` swap
        children); None when absent or an ``nn.Identity``."""
        name = self._role_names[role]
        child = None if name is None else self._modules[name]
        return None if isinstance(child, nn.Identity) else child

    @property
    def original(self) -> nn.Module:
        return self.__dict__["_evit_original"]

    def restore(self) -> nn.Module:
        """Hand back the original module, carrying over what changed while patched: children swapped in
        (e.g. by ``SyncBatchNorm.convert_sync_batchnorm``), tensors replaced (e.g. by ``.to()`` or
        ``load_state_dict(assign=True)``) and the train/eval mode."""
        original = self.original
        for store in ("_modules", "_parameters", "_buffers"):
            mine, theirs = getattr(self, store), getattr(original, store)
            for name in theirs:
                theirs[name] = mine[name]
        original.train(self.training)
        return original

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, replaces={type(self.original).__module__}.{type(self.original).__qualname__}"


class FusedResidual(FusedModule):
    """Base of the drop-ins for ``x + m(x)`` wrappers (timm ``ResidualDrop``, Cream ``Residual``): where the fused
    path cannot serve, they run the wrapper's own forward on themselves, which reads ``m``, ``training`` and
    timm's ``drop``."""

    @property
    def drop(self) -> float:
        """The original's stochastic-depth rate (timm ``ResidualDrop``), read live for its forward."""
        return self.original.drop

    def _run_original(self, x):
        return type(self.original).forward(self, x)

    def _stochastic_depth_active(self) -> bool:
        return self.training and getattr(self.original, "drop", 0.0) > 0
