"""evit::relu_linear_attention_tokens (Sana's token-major ReLU linear attention) against diffusers' own formulas in
float64, its hand-written backward, and its Triton kernels (through the interpreter on CPU, tiny shapes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from evit_kernels import dispatch
from evit_kernels.ops.relu_linear_attention import (
    TokenMajorArgs,
    relu_linear_attention_tokens,
    relu_linear_attention_tokens_reference,
)
from tests.numerics import assert_within_twice_eager

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-15


def _upcast(t):
    """diffusers' ``.float()``, which would also round float64 to float32: the comparisons here are in float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def sana_image_attention(q, k, v, heads, eps=EPS):
    """``SanaLinearAttnProcessor2_0`` between the projections and ``to_out``, as diffusers writes it (but for
    ``.float()``, see :func:`_upcast`)."""
    query = q.transpose(1, 2).unflatten(1, (heads, -1))
    key = k.transpose(1, 2).unflatten(1, (heads, -1)).transpose(2, 3)
    value = v.transpose(1, 2).unflatten(1, (heads, -1))
    query, key = F.relu(query), F.relu(key)
    query, key, value = _upcast(query), _upcast(key), _upcast(value)
    value = F.pad(value, (0, 0, 0, 1), mode="constant", value=1.0)
    out = torch.matmul(torch.matmul(value, key), query)
    out = out[:, :, :-1] / (out[:, :, -1:] + eps)
    return out.flatten(1, 2).transpose(1, 2).to(q.dtype)


def sana_video_attention(q, k, v, rotated_q, rotated_k, heads, eps=EPS):
    """``SanaLinearAttnProcessor3_0`` from its ReLU'd, rotated q and k on, as diffusers writes it (but for
    ``.float()``)."""
    query, key, value, query_rotate, key_rotate = (
        t.unflatten(2, (heads, -1)).permute(0, 2, 3, 1) for t in (F.relu(q), F.relu(k), v, rotated_q, rotated_k))
    query_rotate, key_rotate, value = _upcast(query_rotate), _upcast(key_rotate), _upcast(value)
    z = 1 / (key.sum(dim=-1, keepdim=True).transpose(-2, -1) @ query + eps)
    out = torch.matmul(torch.matmul(value, key_rotate.transpose(-1, -2)), query_rotate) * z
    return out.flatten(1, 2).transpose(1, 2).to(q.dtype)


def rotate(t, angles):
    """``t`` (B, N, C) with each channel pair (2i, 2i+1) rotated by ``angles`` (N, C/2), as a rotary embedding."""
    x1, x2 = t.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = angles.cos().to(t.dtype), angles.sin().to(t.dtype)
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


def with_rotated(q, k, v):
    """q, k, v and the video form's rotated q and k: the rotary embedding of the ReLU'd q and k, as the processor
    makes them (unrelated random tensors would let a token whose ReLU'd q is 0 divide a nonzero numerator by eps)."""
    angles = torch.rand(max(q.shape[1], k.shape[1]), q.shape[2] // 2, dtype=torch.float64, device=q.device) * 6.3
    return [q, k, v, rotate(F.relu(q), angles[:q.shape[1]]), rotate(F.relu(k), angles[:k.shape[1]])]


def make(batch, tokens, heads, dim, dtype=torch.float64, scale=1.0, kv_tokens=None, rotated=False):
    """q (B, N, heads·dim), k and v (B, M, heads·dim) and, for the rotated form, rotated q and k."""
    shapes = [(batch, tokens), (batch, kv_tokens or tokens), (batch, kv_tokens or tokens)]
    q, k, v = [(torch.randn(*shape, heads * dim, dtype=torch.float64, device=DEVICE) * scale).to(dtype)
               for shape in shapes]
    return with_rotated(q, k, v) if rotated else [q, k, v]


def attention(tensors, heads, backend="auto", eps=EPS):
    q, k, v, *rotated = tensors
    return relu_linear_attention_tokens(q, k, v, heads, eps, *rotated, backend=backend)


@pytest.mark.parametrize("tokens, kv_tokens", [(13, None), (1, None), (5, None), (7, 11)])
@pytest.mark.parametrize("heads, dim", [(2, 8), (3, 32), (1, 12)])
def test_reference_matches_diffusers_formulas_in_float64(tokens, kv_tokens, heads, dim):
    tensors = make(2, tokens, heads, dim, kv_tokens=kv_tokens)
    torch.testing.assert_close(attention(tensors, heads), sana_image_attention(*tensors, heads),
                               rtol=1e-12, atol=1e-12)
    rotated = make(2, tokens, heads, dim, kv_tokens=kv_tokens, rotated=True)
    torch.testing.assert_close(attention(rotated, heads), sana_video_attention(*rotated, heads),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rotated", [False, True])
def test_hand_written_backward_passes_gradcheck(rotated):
    tensors = [t.requires_grad_() for t in make(2, 5, 2, 4, kv_tokens=6, rotated=rotated)]
    op = torch.ops.evit.relu_linear_attention_tokens
    assert torch.autograd.gradcheck(
        lambda q, k, v, *r: op(q, k, v, *(r or (None, None)), 2, EPS, "torch"), tensors)


def test_fp32_output_in_the_input_dtype_and_autocast_casts_inputs():
    tensors = make(1, 6, 2, 8, dtype=torch.float32)
    assert attention(tensors, 2).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention([t.cpu() for t in tensors], 2)
    assert out.dtype == torch.bfloat16


def test_zero_query_gives_zero_not_nan():
    q, k, v = make(1, 4, 1, 8, dtype=torch.float32)
    out = attention([-q.abs() - 1, k, v], 1, backend="torch")
    assert torch.equal(out, torch.zeros_like(out))


def test_bad_inputs_raise_clear_errors():
    q, k, v = make(1, 4, 2, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"\(B, N, heads·d\)"):
        relu_linear_attention_tokens(q[0], k, v, 2, EPS)
    with pytest.raises(ValueError, match="one shape"):
        relu_linear_attention_tokens(q, k, v[:, :3], 2, EPS)
    with pytest.raises(ValueError, match="dividing"):
        relu_linear_attention_tokens(q, k, v, 3, EPS)
    with pytest.raises(ValueError, match="go together"):
        relu_linear_attention_tokens(q, k, v, 2, EPS, rotated_q=q)
    with pytest.raises(TypeError, match="dtype"):
        relu_linear_attention_tokens(q, k.half(), v, 2, EPS)


# (batch, tokens, heads, dim, rotated, layout): prime N, N < d, every head dim the kernels take, q/k/v as slices of
# one fused (B, N, 3C) projection (non-dense, same strides). Not one token: then out = v exactly, the gradients of
# q and k are 0 in exact arithmetic and both sides return rounding noise of different sizes.
SHAPES = [
    (2, 13, 2, 8, False, "dense"),
    (1, 5, 1, 32, False, "fused"),
    (1, 2, 2, 16, False, "dense"),
    (2, 7, 2, 8, True, "dense"),
    (1, 11, 1, 32, True, "fused"),
    (1, 70, 1, 16, True, "dense"),  # two chunks: the reduction and apply passes
    # wider than a column block (kv split over programs): Sana-Video's 112 (padded to 128, four blocks), and 64
    (1, 70, 2, 112, True, "fused"),  # two chunks
    (2, 6, 1, 64, False, "dense"),
]


def _in_layout(tensors, layout):
    if layout == "dense":
        return tensors
    fused = torch.cat(tensors[:3], dim=-1)  # as diffusers' fuse_qkv_projections leaves them: views of one output
    views = list(fused.chunk(3, dim=-1))
    return views + [torch.cat([r, r, r], dim=-1)[..., :r.shape[-1]] for r in tensors[3:]]


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch, tokens, heads, dim, rotated, layout", SHAPES)
def test_triton_forward_and_gradients_within_twice_eager_error(poisoned_empty, batch, tokens, heads, dim, rotated,
                                                               layout, dtype):
    tensors = _in_layout(make(batch, tokens, heads, dim, dtype, rotated=rotated), layout)
    exact = [t.detach().double().requires_grad_() for t in tensors]
    expected = relu_linear_attention_tokens_reference(TokenMajorArgs(*exact[:3], *(exact[3:] or (None, None)),
                                                                     heads, EPS))
    grad_out = torch.randn_like(expected)
    exact_grads = torch.autograd.grad(expected, exact, grad_out)

    def run(backend):
        leaves = [t.detach().requires_grad_() for t in tensors]  # detached views keep the fused layout's strides
        out = attention(leaves, heads, backend)
        return out, torch.autograd.grad(out, leaves, grad_out.to(dtype))

    (out, grads), (eager_out, eager_grads) = run("triton"), run("torch")
    assert out.dtype == dtype and out.shape == expected.shape and torch.isfinite(out).all()
    terms = tokens + dim
    assert_within_twice_eager(out, eager_out, expected, dtype, terms)
    for got, eager, ref in zip(grads, eager_grads, exact_grads, strict=True):
        assert torch.isfinite(got).all()
        assert_within_twice_eager(got, eager, ref, dtype, terms, "gradient")


def test_triton_reads_the_fused_projection_slices_in_place(op_runs):
    """q, k, v as views of one fused projection output share strides: the kernels take them without a copy."""
    fused = torch.randn(1, 6, 3 * 16, device=DEVICE)
    q, k, v = fused.chunk(3, dim=-1)
    args = TokenMajorArgs(q, k, v, None, None, 2, EPS)
    assert not dispatch.get("relu_linear_attention_tokens", "triton").not_supported_reasons(args)
    torch.testing.assert_close(attention([q, k, v], 2, "triton"), attention([q, k, v], 2, "torch"))
    assert op_runs == [("relu_linear_attention_tokens", "triton"), ("relu_linear_attention_tokens", "torch")]


def test_triton_stride_zero_gradient_of_sum():
    tensors = [t.requires_grad_() for t in make(1, 6, 2, 8, torch.float32, rotated=True)]
    attention(tensors, 2, "triton").sum().backward()
    exact = [t.detach().double().requires_grad_() for t in tensors]
    attention(exact, 2, "torch").sum().backward()
    for got, ref in zip(tensors, exact, strict=True):
        torch.testing.assert_close(got.grad.double(), ref.grad, rtol=1e-4, atol=1e-5)


def test_triton_fp16_large_activations_stay_finite():
    """Sums over N overflow fp16 and 1e-15 is 0 in fp16: the fp32 accumulation keeps the output finite."""
    tensors = make(1, 49, 2, 16, torch.float16, scale=300.0)
    naive = (F.relu(tensors[1]).transpose(1, 2) @ tensors[2])
    assert not torch.isfinite(naive).all(), "the input must overflow a plain fp16 computation"
    out = attention(tensors, 2, "triton")
    expected = attention([t.double() for t in tensors], 2)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, rtol=2e-3, atol=2e-3 * expected.abs().max().item())


def test_opcheck_triton_backend():
    tensors = [t.requires_grad_() for t in make(1, 5, 2, 8, torch.float32, rotated=True)]
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if DEVICE == "cpu":  # the interpreter cannot read the storage of the tensors AOT tracing hands the kernel
        tests = tests[:-1]
    torch.library.opcheck(torch.ops.evit.relu_linear_attention_tokens, (*tensors, 2, EPS, "triton"), test_utils=tests)


def test_triton_refusals_say_why(pretend_measured):
    backend = dispatch.get("relu_linear_attention_tokens", "triton")
    q, k, v = make(1, 4, 2, 12, torch.float32)
    assert any("head dim 12" in r for r in backend.not_supported_reasons(TokenMajorArgs(q, k, v, None, None, 2, EPS)))
    q, k, v = make(1, 4, 2, 8, torch.float32, kv_tokens=5)
    assert any("tokens" in r for r in backend.not_supported_reasons(TokenMajorArgs(q, k, v, None, None, 2, EPS)))
    q, k, v = make(1, 4, 2, 8, torch.float32)
    k = k.transpose(1, 2).contiguous().transpose(1, 2)  # token-minor: other strides than q and v
    assert any("strides" in r for r in backend.not_supported_reasons(TokenMajorArgs(q, k, v, None, None, 2, EPS)))
    with pytest.raises(dispatch.BackendUnavailable, match="strides"):
        relu_linear_attention_tokens(q, k, v, 2, EPS, backend="triton")
    pretend_measured("relu_linear_attention_tokens", "triton")  # "auto" must pass it over, to the reference
    assert dispatch.choose(TokenMajorArgs(q, k, v, None, None, 2, EPS)).name == "torch"
    torch.testing.assert_close(relu_linear_attention_tokens(q, k, v, 2, EPS), sana_image_attention(q, k, v, 2))
