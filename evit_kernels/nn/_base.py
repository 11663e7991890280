"""What every drop-in module shares: sharing the original's state and giving it back."""

from __future__ import annotations

from torch import nn


class Unsupported(ValueError):
    """The module matched a patch rule but has a configuration the fused module cannot compute exactly."""


class FusedModule(nn.Module):
    """Base of the ``Fused<Original>`` modules.

    It adopts every child, parameter and buffer of ``original`` under the same names (the same objects), so
    ``state_dict`` keys and shapes are unchanged and an optimizer built before patching keeps training it.
    ``original`` itself is kept out of the module tree, for :meth:`restore`. ``backend`` selects the
    implementation ("auto", "torch", "triton" or "cuda"; see :mod:`evit_kernels.dispatch`).
    """

    patch_inside = True
    """Whether :func:`evit_kernels.patch` also swaps this module's children (False when it computes them)."""

    def __init__(self, original: nn.Module, backend: str = "auto"):
        super().__init__()
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
