"""Where and in what precision the benchmarks run: real shapes on a GPU, tiny smoke shapes on CPU."""

import torch

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
