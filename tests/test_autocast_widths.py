"""Inputs wider than the compute dtype, as autocast leaves them around a block it runs in fp16/bf16: an fp32 input,
which autocast casts for the block's first conv, and the same fp32 tensor as the shortcut, which eager adds as it is.

- A residual wider than the inputs (conv_bn_act, conv_block, ffn): read as it is, the output fp32 as eager's sum:
  within twice eager's error of a float64 formula on both backends (every Triton kernel kind that adds a residual).
- An fp32 input under autocast (conv_bn_act, conv_block): taken as it is and rounded to the weights' dtype by the
  op, where the kernels can as they load it: exactly the values of autocast's cast (bit for bit against the op on the
  cast input, every kernel kind).

Both: the fake output's dtype, gradients in each input's dtype, clear refusals of every other mix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from evit_kernels import dispatch
from evit_kernels.ops.conv_block import ConvBlockArgs, _whole_block_config, conv_block
from evit_kernels.ops.conv_bn_act import ConvBnActArgs, conv_bn_act, kernel_kind
from evit_kernels.ops.ffn import ffn
from evit_kernels.triton import _common as triton_common
from tests.numerics import assert_within_twice_eager, in_layout

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOW = [torch.float16, torch.bfloat16]
LOW_IDS = ["fp16", "bf16"]


def _randn(*shape, scale=1.0):
    return torch.randn(*shape, device=DEVICE) * scale


# (C_in, C_out, H, W, k, stride, groups, layout): one conv per Triton kind that adds a residual.
CONVS = {
    "depthwise": (12, 12, 5, 7, 3, 1, 12, "channels_last"),
    "dense_1x1": (20, 24, 3, 5, 1, 1, 1, "nchw"),
    "rows_rgb": (3, 8, 4, 9, 3, 1, 1, "nchw"),
}


def _conv_inputs(name: str, dtype: torch.dtype) -> tuple[list, dict]:
    """([x, weight, bias] in ``dtype``, an fp32 residual), conv keyword arguments."""
    c_in, c_out, height, width, k, stride, groups, layout = CONVS[name]
    x = in_layout(_randn(2, c_in, height, width), layout).to(dtype)
    weight = _randn(c_out, c_in // groups, k, k, scale=(c_in // groups * k * k) ** -0.5).to(dtype)
    bias = _randn(c_out).to(dtype)
    residual = in_layout(_randn(2, c_out, height, width), layout)
    return [x, weight, bias, residual], dict(stride=stride, padding=k // 2, groups=groups)


def _double(tensors: list) -> list:
    return [None if t is None else t.double() for t in tensors]


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", CONVS)
def test_conv_bn_act_returns_the_fp32_sum(poisoned_empty, name, backend, dtype):
    (x, weight, bias, residual), conv = _conv_inputs(name, dtype)
    calls = []
    with dispatch.observing(lambda chosen, args: calls.append(chosen.name)):
        out = conv_bn_act(x, weight, bias, activation="hardswish", residual=residual, backend=backend, **conv)
    assert calls == [backend]
    # eager's own: the conv rounded to dtype, the fp32 residual added to it
    eager = F.hardswish(F.conv2d(x, weight, bias, conv["stride"], conv["padding"], 1, conv["groups"])) + residual
    x64, w64, b64, r64 = _double([x, weight, bias, residual])
    expected = F.hardswish(F.conv2d(x64, w64, b64, conv["stride"], conv["padding"], 1, conv["groups"])) + r64
    assert out.dtype == torch.float32 and out.shape == expected.shape
    assert out.stride() == residual.stride()  # the input's layout
    assert_within_twice_eager(out, eager, expected, dtype, weight[0].numel())


@pytest.mark.parametrize("name, kind", [("depthwise", "depthwise"), ("dense_1x1", "dense"), ("rows_rgb", "rows")])
def test_each_conv_takes_its_kernel(name, kind):
    (x, weight, bias, residual), conv = _conv_inputs(name, torch.bfloat16)
    pair = [conv["stride"]] * 2, [conv["padding"]] * 2
    assert kernel_kind(ConvBnActArgs(x, weight, bias, *pair, [1, 1], conv["groups"], "none", residual)) == kind


# (batch, C, hidden, C_out, H, W, gate): two MBConvs (16 and 80 output channels) and a GLUMBConv, each given a
# residual.
BLOCKS = {
    "mbconv_narrow": (2, 16, 32, 16, 5, 7, None),
    "mbconv_wide": (1, 80, 40, 80, 5, 6, None),
    "glumbconv": (1, 16, 48, 16, 4, 5, "silu"),
}


def _block_inputs(name: str, dtype: torch.dtype) -> tuple[list, torch.Tensor, str | None]:
    batch, channels, hidden, out_channels, height, width, gate = BLOCKS[name]
    projected = hidden // 2 if gate else hidden
    weights = [_randn(hidden, channels, 1, 1, scale=channels ** -0.5), _randn(hidden),
               _randn(hidden, 1, 3, 3, scale=1 / 3), _randn(hidden),
               _randn(out_channels, projected, 1, 1, scale=projected ** -0.5), _randn(out_channels)]
    x = _randn(batch, channels, height, width)
    return [t.to(dtype) for t in (x, *weights)], _randn(batch, out_channels, height, width), gate


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", BLOCKS)
def test_conv_block_returns_the_fp32_sum(poisoned_empty, name, backend, dtype):
    tensors, residual, gate = _block_inputs(name, dtype)
    activations = ("silu", "none", "none") if gate else ("hardswish", "hardswish", "none")
    kwargs = dict(activations=activations, gate=gate)
    out = conv_block(*tensors, residual=residual, backend=backend, **kwargs)
    eager = conv_block(*tensors, backend="torch", **kwargs) + residual
    expected = conv_block(*_double(tensors), residual=residual.double(), backend="torch", **kwargs)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    terms = sum(w[0].numel() for w in tensors[1::2])
    assert_within_twice_eager(out, eager, expected, dtype, terms)


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ffn_returns_the_fp32_sum(poisoned_empty, backend, dtype):
    x, residual = _randn(2, 24, 3, 5).to(dtype), _randn(2, 24, 3, 5)
    weights = [_randn(48, 24, 1, 1, scale=24 ** -0.5), _randn(48), _randn(24, 48, 1, 1, scale=48 ** -0.5),
               _randn(24)]
    w1, b1, w2, b2 = (t.to(dtype) for t in weights)
    out = ffn(x, w1, b1, w2, b2, residual=residual, backend=backend)
    eager = F.conv2d(F.relu(F.conv2d(x, w1, b1)), w2, b2) + residual
    x64, w164, b164, w264, b264 = _double([x, w1, b1, w2, b2])
    expected = F.conv2d(F.relu(F.conv2d(x64, w164, b164)), w264, b264) + residual.double()
    assert out.dtype == torch.float32
    assert_within_twice_eager(out, eager, expected, dtype, 24 + 48)


def test_under_autocast_the_residual_is_not_cast():
    """x is cast for the conv, the fp32 residual added as it is: the fp32 sum, as autocast's conv plus the add."""
    (x, weight, bias, residual), conv = _conv_inputs("dense_1x1", torch.float32)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = conv_bn_act(x, weight, bias, residual=residual, **conv)
        eager = F.conv2d(x, weight, bias) + residual
    assert out.dtype == eager.dtype == torch.float32
    x64, w64, b64, r64 = _double([x.bfloat16(), weight.bfloat16(), bias.bfloat16(), residual])
    assert_within_twice_eager(out, eager, F.conv2d(x64, w64, b64) + r64, torch.bfloat16, 20)


def test_gradients_come_in_each_inputs_dtype():
    (x, weight, bias, residual), conv = _conv_inputs("depthwise", torch.bfloat16)
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias, residual)]
    out = conv_bn_act(*leaves[:3], activation="relu", residual=leaves[3], **conv)
    grad = torch.randn_like(out)
    out.backward(grad)
    exact = [t.detach().double().requires_grad_() for t in (x, weight, bias, residual)]
    (F.relu(F.conv2d(*exact[:3], conv["stride"], conv["padding"], 1, conv["groups"])) + exact[3]).backward(
        grad.double())
    for got, ref in zip(leaves, exact):
        assert got.grad.dtype == got.dtype
        torch.testing.assert_close(got.grad.double(), ref.grad, rtol=3e-2, atol=3e-2)
    assert torch.equal(leaves[3].grad, grad)  # d(out)/d(residual) is the identity, in fp32


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend):
    """The fake output is fp32 too (torch.compile and export see the dtype the kernels return)."""
    (x, weight, bias, residual), conv = _conv_inputs("dense_1x1", torch.bfloat16)
    args = (x, weight, bias, [1, 1], [0, 0], [1, 1], 1, "relu", residual, backend)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.evit.conv_bn_act.default, args, test_utils=tests)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = torch.ops.evit.conv_bn_act(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    assert fake.dtype == torch.float32


@pytest.mark.parametrize("x_dtype, residual_dtype", [
    (torch.float32, torch.bfloat16),  # narrower than the input
    (torch.bfloat16, torch.float16),  # another low precision
    (torch.float16, torch.float64),
])
def test_other_mixes_are_refused(x_dtype, residual_dtype):
    (x, weight, bias, residual), conv = _conv_inputs("dense_1x1", x_dtype)
    with pytest.raises(TypeError, match="residual has dtype"):
        conv_bn_act(x, weight, bias, residual=residual.to(residual_dtype), **conv)
    with pytest.raises(TypeError, match="residual has dtype"):
        ffn(x, weight, None, weight.transpose(0, 1).contiguous(), None, residual=residual.to(residual_dtype)[:, :20])


def test_a_residual_on_another_device_is_refused():
    (x, weight, bias, residual), conv = _conv_inputs("dense_1x1", torch.bfloat16)
    with pytest.raises(ValueError, match="residual is on meta"):
        conv_bn_act(x, weight, bias, residual=residual.to("meta"), **conv)


@pytest.mark.parametrize("wide", ["input", "residual"])
def test_the_cuda_kernel_refuses_a_wider_tensor(wide):
    (x, weight, bias, residual), conv = _conv_inputs("depthwise", torch.bfloat16)
    x = x.float() if wide == "input" else x
    residual = residual if wide == "residual" else residual.bfloat16()
    args = ConvBnActArgs(x, weight, bias, [1, 1], [1, 1], [1, 1], conv["groups"], "none", residual)
    reasons = dispatch.get("conv_bn_act", "cuda").input_reasons(args)
    assert any(f"a torch.float32 {wide} with torch.bfloat16 weights" in r for r in reasons)
    same = ConvBnActArgs(x.bfloat16(), weight, bias, [1, 1], [1, 1], [1, 1], conv["groups"], "none",
                         residual.bfloat16())
    assert not any("weights" in r for r in dispatch.get("conv_bn_act", "cuda").input_reasons(same))


# --------------------------------------------------------------------------------- an fp32 input under autocast


class _Casts(TorchDispatchMode):
    """Records the tensors every aten cast (``_to_copy``) outside the evit ops reads (an op runs whole under the
    mode: the casts a backend makes inside are not seen)."""

    def __init__(self):
        super().__init__()
        self.sources = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default:
            self.sources.append(args[0])
        return func(*args, **(kwargs or {}))


def _observed_inputs(call) -> tuple:
    """(the output of ``call()``, the x of every op call it makes, in order, the tensors cast on the way)."""
    seen = []
    with dispatch.observing(lambda chosen, args: seen.append(args.x)), _Casts() as casts:
        out = call()
    return out, seen, casts.sources


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", CONVS)
def test_conv_bn_act_rounds_an_fp32_input_as_autocast_casts_it(poisoned_empty, name, backend):
    (x, weight, bias, residual), conv = _conv_inputs(name, torch.float32)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out, seen, cast_sources = _observed_inputs(lambda: conv_bn_act(
            x, weight, bias, activation="gelu_tanh", residual=residual, backend=backend, **conv))
    assert len(seen) == 1 and seen[0] is x  # not cast before the op
    # Cast inside it by the reference and by the kernels that cast before loading (depthwise, row-staged); the
    # implicit GEMM rounds x as it loads it, with no cast's pass (docs/ops.md, "the input").
    assert any(t is x for t in cast_sources) == (backend == "torch" or name != "dense_1x1")
    cast = [t.bfloat16() for t in (x, weight, bias)]
    expected = conv_bn_act(*cast, activation="gelu_tanh", residual=residual, backend=backend, **conv)
    assert out.dtype == expected.dtype == torch.float32 and out.stride() == expected.stride()
    assert torch.equal(out, expected)


# Both paths of conv_block's Triton backend: the spatial-conv-and-projection kernel (DSConv; MBConv after its expand;
# FusedMBConv), and layer by layer on conv_bn_act's kernels (a block whose grid is smaller than the GPU, as these tiny
# grids are unless the SM count is taken as 0): (block, kernel size, SM count taken as 0).
WIDE_INPUT_BLOCKS = {
    "dsconv_kernel": ("dsconv", 3, True),
    "mbconv_kernel": ("mbconv_narrow", 3, True),
    "mbconv_layer_by_layer": ("mbconv_narrow", 3, False),
    "full_kernel": ("fused", 3, True),
    "full_layer_by_layer": ("fused", 3, False),
}


def _wide_input_block(name: str, monkeypatch) -> tuple[list, dict]:
    base, k, no_sms = WIDE_INPUT_BLOCKS[name]
    if no_sms:
        monkeypatch.setattr(triton_common, "SMS", 0)
    if base in BLOCKS:
        (x, w1, b1, _, b2, w3, b3), residual, _ = _block_inputs(base, torch.float32)
        w2 = _randn(w1.shape[0], 1, k, k, scale=1 / k)
        return [x, w1, b1, w2, b2, w3, b3], dict(residual=residual)
    x = _randn(2, 16, 6, 5)
    w2 = _randn(32, 16, k, k, scale=(16 * k * k) ** -0.5) if base == "fused" else _randn(16, 1, k, k, scale=1 / k)
    w3 = _randn(16, w2.shape[0], 1, 1, scale=w2.shape[0] ** -0.5)
    return [x, None, None, w2, _randn(w2.shape[0]), w3, _randn(16)], dict(residual=x, groups=1 if base == "fused"
                                                                          else None)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # tanh saturating, in numpy
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", WIDE_INPUT_BLOCKS)
def test_conv_block_rounds_an_fp32_input_as_autocast_casts_it(poisoned_empty, monkeypatch, name, backend):
    tensors, kwargs = _wide_input_block(name, monkeypatch)
    x = tensors[0]
    activations = ("hardswish", "gelu_tanh", "none")
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out, seen, cast_sources = _observed_inputs(lambda: conv_block(*tensors, activations=activations,
                                                                      backend=backend, **kwargs))
    assert seen[0] is x  # not cast before the op
    # Cast inside it by the reference and before the depthwise taps of the DSConv kernel's path; the expand's (on
    # either MBConv path) or the full conv's implicit GEMM (on either path) rounds x as it loads it, with no cast's
    # pass (docs/ops.md, "the input").
    assert any(t is x for t in cast_sources) == (backend == "torch" or name == "dsconv_kernel")
    cast = [None if t is None else t.bfloat16() for t in tensors]
    expected = conv_block(*cast, activations=activations, backend=backend, **kwargs)
    assert out.dtype == expected.dtype == torch.float32
    assert torch.equal(out, expected)


def test_the_block_cases_take_their_paths(monkeypatch):
    paths = {}
    for name in WIDE_INPUT_BLOCKS:
        monkeypatch.undo()
        tensors, kwargs = _wide_input_block(name, monkeypatch)
        x, w1, b1, w2, b2, w3, b3 = [None if t is None else t.to("meta", torch.bfloat16) for t in tensors]
        groups = kwargs.get("groups") or w2.shape[0]
        k = w2.shape[2]
        args = ConvBlockArgs(x, w1, b1, "none", w2, b2, "none", [1, 1], [k // 2] * 2, groups, w3, b3, "none")
        paths[name] = _whole_block_config(args)[0] is not None
    assert paths == {"dsconv_kernel": True, "mbconv_kernel": True, "mbconv_layer_by_layer": False,
                     "full_kernel": True, "full_layer_by_layer": False}


def test_gradients_under_autocast_match_eagers():
    (x, weight, bias, residual), conv = _conv_inputs("dense_1x1", torch.float32)
    grads = []
    for fused in (True, False):
        leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias, residual)]
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            if fused:
                out = conv_bn_act(*leaves[:3], activation="relu", residual=leaves[3], **conv)
            else:
                out = F.relu(F.conv2d(*leaves[:3])) + leaves[3]
        out.backward(torch.ones_like(out))
        grads.append([t.grad for t in leaves])
    for got, eager in zip(*grads):
        assert got.dtype == eager.dtype == torch.float32
        torch.testing.assert_close(got, eager, rtol=1e-2, atol=1e-2)


def test_opcheck_of_an_fp32_input_with_bf16_weights():
    """The fake output has the weights' dtype, as the kernels' (torch.compile and export see that dtype)."""
    (x, weight, bias, _), conv = _conv_inputs("dense_1x1", torch.bfloat16)
    args = (x.float(), weight, bias, [1, 1], [0, 0], [1, 1], 1, "relu", None, "triton")
    torch.library.opcheck(torch.ops.evit.conv_bn_act.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_outside_autocast_an_input_of_another_dtype_is_refused():
    (x, weight, bias, _), conv = _conv_inputs("dense_1x1", torch.bfloat16)
    with pytest.raises(TypeError, match="weight has dtype"):
        conv_bn_act(x.float(), weight, bias, **conv)
