"""Where and in what precision the benchmarks run: real shapes on a GPU, tiny smoke shapes on CPU."""

import torch

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPE = torch.bfloat16 if ON_GPU else torch.float32

KERNELS = "experimental"
"""The backend request of the variants timed on this package's kernels: each kernel wherever it takes the inputs.
No kernel is validated on a GPU yet, so under "auto" a patched model would run the reference."""
