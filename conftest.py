"""Shared by tests/ and benchmarks/: without a GPU, Triton kernels run through the Triton interpreter on CPU
tensors. Set before any @triton.jit kernel is defined, i.e. before evit_kernels' Triton modules import."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
