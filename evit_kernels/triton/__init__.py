"""Triton kernels, one file per op (imported lazily by the ops: triton is optional)."""
