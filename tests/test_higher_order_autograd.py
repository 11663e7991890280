"""Second-order gradients (create_graph=True: gradient penalties, meta-learning) through the ops whose backward
is a Triton kernel: a kernel's gradients carry no graph, so under create_graph the backward must run the
differentiable reference, and the second-order term must equal the one plain PyTorch computes."""

from __future__ import annotations

import logging

import pytest
import torch

from evit_kernels import dispatch
from evit_kernels.ops.cascaded_group_attention import WindowAttentionArgs, window_attention, window_attention_reference
from evit_kernels.ops.relu_linear_attention import (
    ReluLinearAttentionArgs,
    TokenMajorArgs,
    relu_linear_attention,
    relu_linear_attention_reference,
    relu_linear_attention_tokens,
    relu_linear_attention_tokens_reference,
)
from tests.test_relu_linear_attention_tokens import with_rotated


def _attention_inputs():
    return [torch.randn(2, 3 * 2 * 8, 3, 5), torch.randn(2, 3 * 2 * 8, 3, 5)]


def _token_inputs():  # q, k, v, rotated q, rotated k: the video form, every gradient path
    return with_rotated(*[torch.randn(2, 7, 2 * 8) for _ in range(3)])


def _window_inputs():
    return [torch.randn(2, 16, 16), torch.randn(2, 16, 16), torch.randn(2, 24, 16), torch.randn(16)]


CASES = {
    "relu_linear_attention": (_attention_inputs, lambda t, backend: relu_linear_attention(
        t[0], t[1:], 8, 1e-5, backend=backend),
        lambda t: relu_linear_attention_reference(ReluLinearAttentionArgs(t[0], t[1:], 8, 1e-5))),
    "relu_linear_attention_tokens": (_token_inputs, lambda t, backend: relu_linear_attention_tokens(
        *t[:3], 2, 1e-15, *t[3:], backend=backend),
        lambda t: relu_linear_attention_tokens_reference(TokenMajorArgs(*t, 2, 1e-15))),
    "window_attention": (_window_inputs, lambda t, backend: window_attention(*t, 4, 0.25, backend=backend),
                         lambda t: window_attention_reference(WindowAttentionArgs(*t, 4, 0.25))),
}


def _gradient_penalty(fn, inputs):
    """d/dinputs of ||d(sum(out * w))/dinputs||²: needs the backward to be differentiable."""
    leaves = [t.detach().double().float().requires_grad_() for t in inputs]
    out = fn(leaves)
    weight = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    grads = torch.autograd.grad((out * weight).sum(), leaves, create_graph=True)
    penalty = sum(g.square().sum() for g in grads)
    return torch.autograd.grad(penalty, leaves)


@pytest.mark.parametrize("op", CASES)
def test_second_order_gradients_through_the_triton_backward_are_right(op, caplog, monkeypatch):
    make, run, reference = CASES[op]
    inputs = make()
    monkeypatch.setattr(dispatch, "_LOGGED", set())
    with caplog.at_level(logging.INFO, logger="evit_kernels"):
        got = _gradient_penalty(lambda t: run(t, "triton"), inputs)
    assert "create_graph=True: the backward runs the differentiable reference instead of the triton kernel" \
        in caplog.text
    expected = _gradient_penalty(reference, inputs)
    for g, e in zip(got, expected, strict=True):  # both fp32: the same formula, rounded in another order
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5 * e.abs().max().item())
