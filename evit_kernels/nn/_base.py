"""What every drop-in module shares: recognising its originals, sharing their state and giving it back."""

from __future__ import annotations

import sys

import torch
from torch import nn

from evit_kernels import dispatch
from evit_kernels.nn._fold import BatchNormFold
from evit_kernels.nn._match import TIMM_MSRA, Match, recognise


class Unsupported(ValueError):
    """The module fits one of a fused class's ``MATCHES`` but has a configuration it cannot compute exactly."""


def unfused(module: nn.Module) -> nn.Module:
    """The original module behind ``module`` when it is a fused one, else ``module`` itself."""
    return module.original if isinstance(module, FusedModule) else module


def expect_match(module: nn.Module | None, matches: tuple[Match, ...], where: str, what: str) -> Match:
    """The one of ``matches`` that ``module`` fits; else raise :class:`Unsupported`: "<where> <its class>, not
    <what>", and why when its class name is one of theirs."""
    match, mismatch = recognise(module, matches)
    if match is None:
        raise Unsupported(f"{where} {type(module).__qualname__}, not {what}" + (f" ({mismatch})" if mismatch else ""))
    return match


def role_names(roles: dict[str, tuple[str, ...]], module: nn.Module) -> dict[str, str | None]:
    """Each role's child name in ``module``: the first of the role's names that ``module`` has (None: none)."""
    return {role: next((name for name in names if name in module._modules), None) for role, names in roles.items()}


class FusedModule(nn.Module):
    """Base of the ``Fused<Original>`` modules.

    It adopts every child, parameter and buffer of ``original`` under the same names (the same objects), so
    ``state_dict`` keys and shapes are unchanged and an optimizer built before patching keeps training it.
    ``original`` itself is kept out of the module tree, for :meth:`restore`. ``backend`` selects the
    implementation ("auto", "experimental", "torch", "triton", "cuda", or per op; see :mod:`evit_kernels.dispatch`).
    """

    MATCHES: tuple[Match, ...] = ()
    """The originals :func:`evit_kernels.patch` swaps for this class; its constructor refuses (:class:`Unsupported`)
    the configurations among them that it cannot compute exactly."""

    CHILD_ROLES: dict[str, tuple[str, ...]]
    """For containers whose libraries name the same child differently (timm ``conv`` / Cream ``c``): role → the
    child names the originals use for it, in the order the originals apply them."""

    BN_FOLD: BatchNormFold | None = None
    """Which BatchNorm child :func:`evit_kernels.fold_bn` folds into which layer (roles of ``CHILD_ROLES``); None
    where ``fold_bn`` leaves the module alone."""

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

    @classmethod
    def bn_fold_children(cls, module: nn.Module) -> tuple[str | None, str | None]:
        """The names of the layer and the BatchNorm children of ``module`` (one of this class's originals, or this
        class itself) that ``BN_FOLD`` folds; None for one it lacks."""
        names = role_names(cls.CHILD_ROLES, module)
        return names[cls.BN_FOLD.layer], names[cls.BN_FOLD.norm]

    def _bind_roles(self, block: str) -> None:
        """Bind each of ``CHILD_ROLES`` to the first of its names present, and refuse a child that no role takes."""
        self._role_names = role_names(self.CHILD_ROLES, self)
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


class FusedProcessor:
    """Base of the drop-in attention processors (``Fused<Original>Processor``).

    diffusers' attention modules run their math through a processor object they hold in ``processor`` (not a
    child module, not in the ``state_dict``); the module itself, its projections and any adapters on them stay as
    they are, and the fused processor calls them as the original does. :func:`evit_kernels.patch` swaps a
    processor its class's ``MATCHES`` recognise, :func:`evit_kernels.unpatch` puts the original object back, and
    ``set_attn_processor`` / ``set_processor`` replace it as they would the original.
    """

    MATCHES: tuple[Match, ...] = ()
    """The original processors :func:`evit_kernels.patch` swaps for this class."""

    HOLDER_ATTRIBUTE = "processor"
    """The attribute of an attention module that holds its processor."""

    def __init__(self, original: object, backend: str = "auto"):
        self.original = original
        self.backend = backend

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, request: str) -> None:
        self._backend = dispatch.check_request(request)  # a bad request fails here, not mid-forward

    def restore(self) -> object:
        """The original processor (processors hold no state to carry over)."""
        return self.original

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(backend={self.backend!r}, "
                f"replaces={type(self.original).__module__}.{type(self.original).__qualname__})")


def residual_matches(timm_block: Match, cream_block: Match) -> tuple[Match, Match]:
    """The ``x + m(x)`` wrappers around a block: timm ``ResidualDrop`` holding ``timm_block``, Cream ``Residual``
    holding ``cream_block``."""
    return (Match("timm", "ResidualDrop", (TIMM_MSRA,), ("m", "drop"), children=(("m", (timm_block,)),)),
            Match("Cream", "Residual", None, ("m",), children=(("m", (cream_block,)),)))


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
