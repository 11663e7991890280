"""Where and in what precision the benchmarks run: real shapes on a GPU, tiny smoke shapes on CPU."""

import torch

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPE = torch.bfloat16 if ON_GPU else torch.float32



def use_kernels(model: torch.nn.Module, backend: str = "experimental") -> torch.nn.Module:
    """Set ``backend`` on every fused module of a patched ``model``. The default runs this package's kernels
    wherever they take the inputs: no kernel is validated on a GPU yet, so under "auto" a patched model would run
    the reference."""
    from evit_kernels.nn._base import FusedModule

    for module in model.modules():
        if isinstance(module, FusedModule):
            module.backend = backend
    return model
