"""evit::relu_linear_attention against an independent float64 formula, mit-han-lab's code, and its numerics traps."""

import pytest
import torch
import torch.nn.functional as F
from efficientsam.models.nn.ops import LiteMLA as MitLiteMLA

from evit_kernels import dispatch
from evit_kernels.ops.relu_linear_attention import relu_linear_attention


@pytest.fixture(autouse=True)
def _poison_uninitialized_memory():
    """torch.empty fills floats with NaN in deterministic mode: an output element the op never writes fails."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous)


def padded_v_attention(groups: list[torch.Tensor], dim: int, eps: float) -> torch.Tensor:
    """LiteMLA's attention as the mit-han-lab code writes it (concatenate, pad v with ones, divide), computed
    entirely in the inputs' dtype."""
    cat = torch.cat(groups, dim=1)
    batch, _, height, width = cat.shape
    per_head = cat.reshape(batch, -1, 3 * dim, height * width)
    q, k, v = F.relu(per_head[:, :, :dim]), F.relu(per_head[:, :, dim:2 * dim]), per_head[:, :, 2 * dim:]
    v = F.pad(v, (0, 0, 0, 1), value=1.0)
    out = (v @ k.transpose(-1, -2)) @ q
    return (out[:, :, :-1] / (out[:, :, -1:] + eps)).reshape(batch, -1, height, width)


def make_groups(num_aggregated=1, heads=2, dim=8, shape=(5, 7), batch=2, dtype=torch.float32, scale=1.0):
    return [(torch.randn(batch, 3 * heads * dim, *shape, dtype=torch.float64) * scale).to(dtype)
            for _ in range(1 + num_aggregated)]


def attention(groups, dim, eps, **kwargs):
    return relu_linear_attention(groups[0], groups[1:], dim, eps, **kwargs)


def attention_op(groups, dim, eps):
    """The library op on its reference backend: unlike the Python entry point (which runs the reference as plain
    PyTorch ops), this goes through the op's own, hand-written backward."""
    return torch.ops.evit.relu_linear_attention(groups[0], groups[1:], dim, eps, "torch")


SHAPES = [(5, 7), (2, 2), (1, 1), (13, 1), (1, 11)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dim", [8, 16, 32])
@pytest.mark.parametrize("num_aggregated", [0, 1, 2])
@pytest.mark.parametrize("eps", [1e-5, 1e-15])
def test_matches_float64_formula(shape, dim, num_aggregated, eps):
    groups = make_groups(num_aggregated, dim=dim, shape=shape)
    expected = padded_v_attention([g.double() for g in groups], dim, eps)
    out = attention(groups, dim, eps)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    out64 = attention([g.double() for g in groups], dim, eps)
    torch.testing.assert_close(out64, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(5, 7), (2, 2), (1, 1)])
def test_matches_mit_han_lab_code_on_both_branches(shape):
    """efficientsam's relu_linear_att (N > d) and relu_quadratic_att (N <= d) take the concatenated map."""
    mit = MitLiteMLA(48, 48, dim=8, scales=(5,))
    groups = make_groups(1, heads=6, dim=8, shape=shape, dtype=torch.float64)
    cat = torch.cat(groups, dim=1)
    expected = mit.relu_linear_att(cat) if shape[0] * shape[1] > 8 else mit.relu_quadratic_att(cat)
    torch.testing.assert_close(attention(groups, 8, mit.eps), expected, rtol=1e-12, atol=1e-12)


def test_head_interleaving_and_output_order():
    """Moving one head's block in qkv moves exactly that head's output, and aggregated heads come after qkv's."""
    groups = make_groups(1, heads=3, dim=8, dtype=torch.float64)
    out = attention(groups, 8, 1e-5)
    swapped = [g.clone() for g in groups]
    swapped[0][:, :24], swapped[0][:, 48:] = groups[0][:, 48:], groups[0][:, :24]
    out_swapped = attention(swapped, 8, 1e-5)
    torch.testing.assert_close(out_swapped[:, :8], out[:, 16:24])
    torch.testing.assert_close(out_swapped[:, 16:24], out[:, :8])
    torch.testing.assert_close(out_swapped[:, 24:], out[:, 24:])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_zero_query_gives_zero_not_nan(dtype):
    """relu(q) == 0 for every token: the output is 0/eps = 0. mit-han-lab's eps 1e-15 is 0 in fp16, so the same
    formula computed in fp16 divides 0 by 0."""
    groups = make_groups(1, dim=8, dtype=dtype)
    for g in groups:
        per_head = g.view(g.shape[0], -1, 24, *g.shape[2:])
        per_head[:, :, :8] = -per_head[:, :, :8].abs()
    out = attention(groups, 8, 1e-15)
    assert out.dtype == dtype
    assert torch.equal(out, torch.zeros_like(out))
    if dtype == torch.float16:
        assert padded_v_attention(groups, 8, 1e-15).isnan().all()


def _rounding_bound(out, expected, unit_roundoff):
    """|out - expected| <= rounding the exact value to the output dtype (plus fp32-level slack)."""
    error = (out.double() - expected).abs()
    bound = unit_roundoff * expected.abs() * 1.01 + 1e-5 * expected.abs().max()
    return error, bound


@pytest.mark.parametrize("shape", [(5, 7), (2, 2), (16, 16)])
def test_fp16_large_activations_are_exact_to_output_rounding(shape):
    """q, k, v ~ 300: Σ_n k_n v_n overflows fp16 (eager fp16 gives inf/NaN; efficientsam's quadratic branch, taken
    when N <= d, does too), while the op stays within fp16 rounding of the float64 result."""
    groups = make_groups(1, heads=4, dim=8, shape=shape, dtype=torch.float16, scale=300.0)
    expected = padded_v_attention([g.double() for g in groups], 8, 1e-15)
    out = attention(groups, 8, 1e-15)
    assert out.dtype == torch.float16 and out.isfinite().all()
    error, bound = _rounding_bound(out, expected, 2.0 ** -11)
    assert (error <= bound).all(), f"max error {error.max().item()}"
    assert not padded_v_attention(groups, 8, 1e-15).isfinite().all()
    if shape[0] * shape[1] <= 8:
        mit = MitLiteMLA(64, 64, dim=8, scales=(5,))
        assert not mit.relu_quadratic_att(torch.cat(groups, dim=1)).isfinite().all()


def test_bf16_beats_mit_han_lab_bf16_path():
    """mit-han-lab keeps bf16 through both matmuls; the op accumulates and divides in fp32."""
    groups = make_groups(1, heads=4, dim=16, shape=(9, 11), dtype=torch.bfloat16, scale=30.0)
    expected = padded_v_attention([g.double() for g in groups], 16, 1e-15)
    out = attention(groups, 16, 1e-15)
    assert out.dtype == torch.bfloat16 and out.isfinite().all()
    error, bound = _rounding_bound(out, expected, 2.0 ** -8)
    assert (error <= bound).all(), f"max error {error.max().item()}"
    mit_error = (MitLiteMLA(64, 64, dim=16).relu_linear_att(torch.cat(groups, dim=1)).double() - expected).abs()
    assert error.max() <= mit_error.max()


def test_channels_last_and_non_contiguous_inputs():
    groups = make_groups(2, dim=8, shape=(6, 10))
    expected = padded_v_attention([g.double() for g in groups], 8, 1e-5)
    odd = [groups[0].contiguous(memory_format=torch.channels_last),
           torch.stack([groups[1], -groups[1]], dim=-1)[..., 0],
           groups[2].transpose(2, 3).contiguous().transpose(2, 3)]
    for g, o in zip(groups[1:], odd[1:]):
        torch.testing.assert_close(o, g, rtol=0, atol=0)
    assert not odd[1].is_contiguous() and not odd[2].is_contiguous()
    out = attention(odd, 8, 1e-5)
    assert out.is_contiguous()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_aggregated", [0, 2])
@pytest.mark.parametrize("shape", [(3, 5), (2, 2), (1, 1)])
def test_gradcheck_float64(num_aggregated, shape):
    groups = [g.requires_grad_() for g in make_groups(num_aggregated, heads=2, dim=4, shape=shape, batch=1,
                                                      dtype=torch.float64)]
    assert torch.autograd.gradcheck(lambda *gs: attention_op(list(gs), 4, 1e-5), groups)


def _gradients(groups, dim, eps, function, grad_of):
    leaves = [g.detach().requires_grad_() for g in groups]
    grad_of(function(leaves, dim, eps)).backward()
    return [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("shape", [(5, 7), (2, 2)])
def test_backward_matches_autograd_of_formula_with_odd_grad_strides(shape):
    """Stride-0 grad (y.sum()), a transposed grad, and a plain one: the explicit backward vs float64 autograd."""
    groups = make_groups(1, heads=2, dim=8, shape=shape)
    weight = torch.randn(2, 32, shape[1], shape[0], dtype=torch.float64).transpose(2, 3)
    for grad_of in (lambda y: y.sum(), lambda y: (y * weight.to(y.dtype)).sum(), lambda y: (y ** 2).sum()):
        expected = _gradients([g.double() for g in groups], 8, 1e-5, padded_v_attention, grad_of)
        got = _gradients(groups, 8, 1e-5, attention_op, grad_of)
        for g, e in zip(got, expected):
            assert g.dtype == torch.float32
            torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-5 * e.abs().max().item())


def test_fp16_backward_finite_and_accurate_with_large_activations():
    groups = make_groups(1, heads=2, dim=8, shape=(5, 7), dtype=torch.float16, scale=300.0)
    weight = torch.linspace(-1, 1, 2 * 32 * 5 * 7).view(2, 32, 5, 7).half()  # the same grad in both dtypes
    grad_of = lambda y: (y * weight.to(y.dtype)).sum()
    expected = _gradients([g.double() for g in groups], 8, 1e-15, padded_v_attention, grad_of)
    got = _gradients(groups, 8, 1e-15, attention_op, grad_of)
    for g, e in zip(got, expected):
        assert g.dtype == torch.float16 and g.isfinite().all()
        error, bound = _rounding_bound(g, e, 2.0 ** -11)
        assert (error <= bound).all(), f"max error {error.max().item()}"


# The dynamic-shape AOT check traces the same fake implementation and backward whatever the dtype: one dtype runs it.
@pytest.mark.parametrize("dtype, aot_check", [(torch.float64, "test_aot_dispatch_dynamic"),
                                              (torch.float32, "test_aot_dispatch_static")])
@pytest.mark.parametrize("num_aggregated", [0, 2])
def test_opcheck(dtype, aot_check, num_aggregated):
    qkv, *aggregated = [g.requires_grad_() for g in make_groups(num_aggregated, heads=2, dim=4, shape=(3, 5),
                                                                dtype=dtype)]
    torch.library.opcheck(torch.ops.evit.relu_linear_attention.default, (qkv, aggregated, 4, 1e-5, "torch"),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor", aot_check))


def test_torch_compile_fullgraph_forward_and_backward():
    groups = [g.requires_grad_() for g in make_groups(1, heads=2, dim=8, shape=(3, 5))]
    # The library op itself, so that the graph holds it (fake implementation and registered backward).
    compiled = torch.compile(lambda q, a: attention_op([q, a], 8, 1e-5), backend="aot_eager", fullgraph=True)
    out = compiled(*groups)
    out.sum().backward()
    torch.testing.assert_close(out, attention(groups, 8, 1e-5))
    expected = _gradients(groups, 8, 1e-5, attention, lambda y: y.sum())
    for g, e in zip(groups, expected):
        torch.testing.assert_close(g.grad, e)


def test_autocast_casts_inputs_but_not_the_fp32_accumulation():
    """Under autocast the op sees bf16 inputs, like the conv it follows, yet kv, z and the division (forward
    and backward) stay fp32: the result equals the op on bf16 inputs without autocast."""
    groups = [g.requires_grad_() for g in make_groups(1, dim=8)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(groups, 8, 1e-5)
    out.sum().backward()  # outside autocast, as PyTorch recommends
    assert out.dtype == torch.bfloat16
    expected_grads = _gradients([g.bfloat16() for g in groups], 8, 1e-5, attention, lambda y: y.sum())
    torch.testing.assert_close(out, attention([g.bfloat16() for g in groups], 8, 1e-5), rtol=0, atol=0)
    # fp32 accumulation: within bf16 output rounding of the exact result on the bf16-rounded inputs.
    error, bound = _rounding_bound(out, padded_v_attention([g.bfloat16().double() for g in groups], 8, 1e-5),
                                   2.0 ** -8)
    assert (error <= bound).all(), f"max error {error.max().item()}"
    for g, e in zip(groups, expected_grads):
        torch.testing.assert_close(g.grad, e.float(), rtol=0, atol=0)


def test_bad_inputs_raise_clear_errors():
    qkv, agg = make_groups(1, heads=2, dim=8)
    with pytest.raises(ValueError, match="qkv must be"):
        relu_linear_attention(qkv[0], [], 8, 1e-5)
    with pytest.raises(ValueError, match="multiple of"):
        relu_linear_attention(qkv[:, :40], [], 8, 1e-5)
    with pytest.raises(ValueError, match="dim must be"):
        relu_linear_attention(qkv, [], 0, 1e-5)
    with pytest.raises(ValueError, match=r"aggregated\[0\] has shape"):
        relu_linear_attention(qkv, [agg[..., :3]], 8, 1e-5)
    with pytest.raises(TypeError, match="dtype"):
        relu_linear_attention(qkv, [agg.double()], 8, 1e-5)
    with pytest.raises(TypeError, match="not supported"):
        relu_linear_attention(qkv.to(torch.int32), [], 8, 1e-5)


def test_explicit_request_for_a_missing_backend_raises():
    qkv, agg = make_groups(1, dim=8)
    with pytest.raises(dispatch.BackendUnavailable, match="no cuda implementation"):
        relu_linear_attention(qkv, [agg], 8, 1e-5, backend="cuda")
