"""Test setup: `gpu` tests skip without CUDA (the Triton interpreter is set up by the root conftest.py)."""

import pytest
import torch

from evit_kernels import dispatch, measured
from evit_kernels.fp32_precision import tf32_allowed

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def pretend_measured(monkeypatch):
    """``pretend_measured(op, backend)``: for this test, ``backend`` of ``op`` counts as measured fastest for every
    shape on this machine, so that the automatic choice takes it (and must pass over the inputs it refuses)."""
    fastest = {}
    monkeypatch.setattr(measured, "fastest", lambda args: fastest.get(args.op))

    def mark(op: str, backend: str) -> None:
        fastest[op] = backend

    return mark


@pytest.fixture
def op_runs():
    """The evit ops the code under test runs, as (op, backend) pairs in order (:func:`dispatch.recording`). A fused
    module that falls back to its original layers gives the same numbers, so tests of a fused path check here
    that it was taken."""
    with dispatch.recording() as runs:
        yield runs


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _ieee_fp32_convs():
    """fp32 held to fp32's error: during every test, cuDNN's fp32 convs, and the conv kernels that follow its setting
    (docs/ops.md, "Tensor-core products"), in IEEE precision. PyTorch's default allows TF32, and cuDNN then chooses
    per shape whether to use it, so eager's own fp32 error, the tests' yardstick, would vary with that choice. The
    TF32 builds have GPU tests of their own (docs/validation.md, "fp32 and TF32"). Restored through the legacy flag,
    which sets cuDNN's conv and RNN settings alike: a test that sets the new API's must restore it itself."""
    allowed = tf32_allowed("conv")
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = allowed


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Make torch.empty / torch.empty_like return NaN-filled floating tensors, so an output element a kernel
    never writes shows up as NaN instead of whatever memory held."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))
