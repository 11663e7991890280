"""The Triton backend of evit::relu_linear_attention against a float64 reference (on CPU through the Triton
interpreter on tiny grids; on a GPU with realistic shapes)."""

from __future__ import annotations

import pytest
import torch

from evit_kernels import dispatch
from evit_kernels.ops.relu_linear_attention import (
    ReluLinearAttentionArgs,
    relu_linear_attention,
    relu_linear_attention_reference,
)
from tests.numerics import assert_within_twice_eager

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _sources(batch, heads, dim, height, width, scales, dtype, scale=1.0, channels_last=False):
    shape = (batch, 3 * heads * dim, height, width)
    sources = [(torch.randn(shape, device=DEVICE) * scale).to(dtype) for _ in range(1 + scales)]
    if channels_last:
        sources = [s.contiguous(memory_format=torch.channels_last) for s in sources]
    return sources


# (batch, heads, dim, H, W, scales, channels_last): prime N, N < d, 1×1 maps, non-square, every supported d; NCHW
# maps whose tokens come in runs of 4 (tests/test_pixel_runs.py), one of them in two chunks; NCHW maps whose
# heads the one-pass kernel reads whole (4×5 at d = 16 and at d = 8, padded to 16 rows; 7×7 at d = 32; a 1×1 map:
# ``Heads.whole_rows``).
SHAPES = [
    (2, 2, 8, 5, 7, 1, False),
    (2, 2, 32, 7, 7, 1, False),
    (2, 2, 8, 4, 5, 1, False),
    (2, 1, 16, 1, 1, 0, False),
    (1, 2, 16, 4, 5, 1, False),
    (1, 1, 8, 10, 10, 1, False),
    (1, 3, 16, 3, 3, 0, True),
    (1, 1, 32, 11, 13, 2, False),
    (3, 2, 8, 1, 1, 1, False),
    (1, 1, 16, 2, 1, 1, True),
    (1, 1, 112, 3, 4, 1, True),  # wider than a column block: the _wide_* kernels
]


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch, heads, dim, height, width, scales, channels_last", SHAPES)
def test_forward_and_gradients_within_twice_eager_error(poisoned_empty, batch, heads, dim, height, width, scales,
                                                        channels_last, dtype):
    eps = 1e-5
    sources = _sources(batch, heads, dim, height, width, scales, dtype, channels_last=channels_last)
    exact_inputs = [s.detach().double().requires_grad_() for s in sources]
    expected = relu_linear_attention_reference(ReluLinearAttentionArgs(exact_inputs[0], exact_inputs[1:], dim, eps))
    grad_out = torch.randn_like(expected)
    exact_grads = torch.autograd.grad(expected, exact_inputs, grad_out)

    def run(backend):
        inputs = [s.detach().clone().requires_grad_() for s in sources]
        out = relu_linear_attention(inputs[0], inputs[1:], dim, eps, backend=backend)
        grads = torch.autograd.grad(out, inputs, grad_out.to(dtype))
        return out, grads

    out, grads = run("triton")
    eager_out, eager_grads = run("torch")
    assert out.dtype == dtype and out.shape == expected.shape and torch.isfinite(out).all()
    terms = height * width + dim  # the kv / z sums over tokens, then the products with q
    assert_within_twice_eager(out, eager_out, expected, dtype, terms)
    for got, eager, exact in zip(grads, eager_grads, exact_grads):
        assert torch.isfinite(got).all()
        assert_within_twice_eager(got, eager, exact, dtype, terms, "gradient")


def test_unsplit_tokens_take_one_pass_split_ones_two():
    """One chunk of tokens (a 7×7 map at any batch): kv, z and the output in one launch per source, no partial
    sums; more tokens than one program takes on a small grid: the reduction and apply passes. Either way for the
    aggregated sources, but for fp32 ones, whose one-pass builds spill (docs/ops.md, "ReLU linear attention")."""
    from evit_kernels import predict
    from evit_kernels.ops.relu_linear_attention import relu_linear_attention_aggregated

    def launched(height, width, dim=8, dtype=torch.bfloat16):
        qkv = torch.empty(1, 3 * 4 * dim, height, width, dtype=dtype, device="meta")
        dw = torch.empty(3 * 4 * dim, 1, 5, 5, dtype=dtype, device="meta")
        pw = torch.empty(3 * 4 * dim, dim, 1, 1, dtype=dtype, device="meta")
        with predict.recorded_launches() as launches:
            relu_linear_attention(qkv, [], dim, 1e-5, backend="triton")
            relu_linear_attention_aggregated(qkv, [dw], [None], [pw], [None], dim, 1e-5, backend="triton")
        return [(launch.kernel, launch.grid) for launch in launches]

    assert launched(7, 7) == [("_rla_fwd_one_pass_kernel", (4,)), ("_rla_fwd_one_pass_kernel", (4,)),
                              ("_rla_agg_fwd_one_pass_kernel", (4,))]
    assert launched(14, 14) == [("_rla_fwd_reduce_kernel", (4, 4)), ("_rla_fwd_apply_kernel", (4, 4)),
                                ("_rla_fwd_reduce_kernel", (4, 4)), ("_rla_fwd_apply_kernel", (4, 4)),
                                ("_rla_agg_fwd_reduce_kernel", (4, 4)), ("_rla_agg_fwd_apply_kernel", (4, 4))]
    assert launched(7, 7, 16, torch.float32) == [
        ("_rla_fwd_one_pass_kernel", (4,)), ("_rla_fwd_one_pass_kernel", (4,)),
        ("_rla_agg_fwd_reduce_kernel", (4, 1)), ("_rla_agg_fwd_apply_kernel", (4, 1))]


def test_stride_zero_gradient_of_sum():
    sources = [s.requires_grad_() for s in _sources(1, 2, 8, 3, 5, 1, torch.float32)]
    relu_linear_attention(sources[0], sources[1:], 8, 1e-5, backend="triton").sum().backward()
    exact = [s.detach().double().requires_grad_() for s in sources]
    relu_linear_attention_reference(ReluLinearAttentionArgs(exact[0], exact[1:], 8, 1e-5)).sum().backward()
    for got, ref in zip(sources, exact):
        torch.testing.assert_close(got.grad.double(), ref.grad, rtol=1e-4, atol=1e-5)


def test_fp16_large_activations_with_mit_han_lab_eps():
    # Sums over N overflow fp16 (65504) and eps 1e-15 is 0 in fp16: eager without fp32 copies gives inf/NaN.
    eps = 1e-15
    sources = _sources(1, 2, 16, 7, 7, 1, torch.float16, scale=300.0)
    qkv = sources[0].float().reshape(1, 2, 3, 16, 49)
    naive_kv = qkv[:, :, 1].relu().half() @ qkv[:, :, 2].half().transpose(-1, -2)
    assert not torch.isfinite(naive_kv).all(), "the test input must overflow a plain fp16 computation"

    out = relu_linear_attention(sources[0], sources[1:], 16, eps, backend="triton")
    expected = relu_linear_attention_reference(
        ReluLinearAttentionArgs(sources[0].double(), [s.double() for s in sources[1:]], 16, eps))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, rtol=2e-3, atol=2e-3 * expected.abs().max().item())


def test_all_zero_query_gives_zero_not_nan():
    qkv = _sources(1, 1, 8, 2, 3, 0, torch.float32)[0]
    qkv[:, :8] = -1.0  # every q entry is negative: relu(q) = 0, out = 0 / eps
    out = relu_linear_attention(qkv, [], 8, 1e-15, backend="triton")
    assert torch.equal(out, torch.zeros_like(out))


def test_opcheck_triton_backend():
    sources = [s.requires_grad_() for s in _sources(1, 2, 8, 3, 3, 1, torch.float32)]
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if DEVICE == "cpu":  # the interpreter cannot read the storage of the tensors AOT tracing hands the kernel
        tests = tests[:-1]
    torch.library.opcheck(torch.ops.evit.relu_linear_attention, (sources[0], sources[1:], 8, 1e-5, "triton"),
                          test_utils=tests)


def test_unsupported_inputs_fall_back_or_raise_with_reasons(pretend_measured):
    qkv = _sources(1, 1, 8, 4, 4, 0, torch.float32)[0].double()
    with pytest.raises(dispatch.BackendUnavailable, match="float64"):
        relu_linear_attention(qkv, [], 8, 1e-5, backend="triton")
    strided = _sources(1, 1, 8, 4, 8, 0, torch.float32)[0].transpose(2, 3)  # (H, W) not walkable as one index
    with pytest.raises(dispatch.BackendUnavailable, match="stride"):
        relu_linear_attention(strided, [], 8, 1e-5, backend="triton")
    pretend_measured("relu_linear_attention", "triton")  # so that "auto" considers it: it must pass these over
    for refused in (qkv, strided):
        assert dispatch.choose(ReluLinearAttentionArgs(refused, [], 8, 1e-5)).name == "torch"
    assert torch.isfinite(relu_linear_attention(strided, [], 8, 1e-5)).all()


@pytest.mark.numerics
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch, heads, dim, height, width", [
    (64, 8, 16, 14, 14),    # B1 stage 3 at 224 px
    (256, 16, 32, 7, 7),    # B3 / L1 stage 4 at 224 px
    (1, 8, 16, 64, 128),    # B1 stage 3 at 1024x2048: N = 8192, one image must still fill the GPU
])
def test_realistic_shapes_on_gpu(batch, heads, dim, height, width, dtype):
    sources = _sources(batch, heads, dim, height, width, 1, dtype)
    exact = [s.detach().double().requires_grad_() for s in sources]
    expected = relu_linear_attention_reference(ReluLinearAttentionArgs(exact[0], exact[1:], dim, 1e-5))
    grad_out = torch.randn_like(expected)
    exact_grads = torch.autograd.grad(expected, exact, grad_out)
    for backend in ("triton", "torch"):
        inputs = [s.detach().clone().requires_grad_() for s in sources]
        out = relu_linear_attention(inputs[0], inputs[1:], dim, 1e-5, backend=backend)
        grads = torch.autograd.grad(out, inputs, grad_out.to(dtype))
        if backend == "triton":
            got, got_grads = out, grads
    terms = height * width + dim
    assert_within_twice_eager(got, out, expected, dtype, terms)
    for g, eager, ref in zip(got_grads, grads, exact_grads):
        assert_within_twice_eager(g, eager, ref, dtype, terms, "gradient")


def test_refuses_head_dims_it_does_not_compile_and_tensors_beyond_32_bit_indexing():
    qkv = torch.zeros(1, 1, 1, 1).expand(2**14, 48, 2**9, 2**9)  # 2^41 elements, no memory
    refused = dispatch.get("relu_linear_attention", "triton").not_supported_reasons(
        ReluLinearAttentionArgs(qkv, [], 16, 1e-5))
    assert any("2^31" in r for r in refused)
    small = torch.randn(1, 36, 2, 2)
    refused = dispatch.get("relu_linear_attention", "triton").not_supported_reasons(
        ReluLinearAttentionArgs(small, [], 12, 1e-5))
    assert any("head dim 12" in r for r in refused)
