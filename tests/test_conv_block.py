"""evit::conv_block (a whole MBConv / DSConv / FusedMBConv, BatchNorm folded) and FusedConvBlock: both backends
against a float64 reference (Triton on CPU through the interpreter on tiny grids), which blocks take the
spatial-conv-and-projection kernel and which run layer by layer, and the drop-in module against timm and mit-han-lab
ResidualBlocks in eval and training."""

from __future__ import annotations

import copy
import dataclasses
import logging

import pytest
import timm
import torch
from timm.layers.activations import GELUTanh
from timm.models import efficientvit_mit as timm_mit
from torch import nn

import evit_kernels
from evit_kernels import dispatch, predict
from evit_kernels.bench import randomize_untrained_state
from evit_kernels.nn import conv_block as fused_module_file
from evit_kernels.nn._base import Unsupported
from evit_kernels.nn.conv_block import FusedConvBlock
from evit_kernels.nn.conv_bn_act import FusedConvNormAct
from evit_kernels.ops.conv_block import ConvBlockArgs, _whole_block_config, conv_block
from evit_kernels.ops.conv_bn_act import ACTIVATIONS
from evit_kernels.triton import _common as triton_common
from tests.models import rel_err, with_child
from tests.numerics import assert_same_grads_and_buffers, assert_within_twice_eager, in_layout

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
GLUMBCONV = ("silu", "none", "none")
"""GLUMBConv's activations (expand, depthwise, projection; its gate is SiLU too)."""


@dataclasses.dataclass(frozen=True)
class Case:
    kind: str  # "mbconv" (expand → depthwise → project), "dsconv" (depthwise → project), "fused" (k×k → 1×1)
    batch: int
    channels: int
    hidden: int  # the spatial conv's width; the projection takes half of it in GLU mode
    out_channels: int
    height: int
    width: int
    ksize: int = 3
    stride: int = 1
    layout: str = "contiguous"
    biases: bool = True
    residual: bool = False
    activations: tuple[str, str, str] = ("hardswish", "hardswish", "none")
    gate: str | None = None  # GLU mode (GLUMBConv)
    projection: bool = True  # False: the block ends with the hidden tensor (PatchMerging's conv1 → conv2)


# Every path of the Triton backend in every dtype: the spatial-conv-and-projection kernel (mbconv_*, dsconv_* and
# fused_* with a projection one program holds, no gate; a full conv of 16 input channels or more), and layer by
# layer (the rest); stride 2, 5×5 and 7×7, a 1×1 map, widths that are not powers of two, every layout and no biases.
CASES = {
    "mbconv_7x7_residual": Case("mbconv", 3, 16, 64, 16, 7, 7, residual=True),
    "mbconv_14x14_gelu": Case("mbconv", 1, 24, 40, 20, 14, 14, activations=("gelu_tanh", "gelu_tanh", "none")),
    "mbconv_stride2_channels_last": Case("mbconv", 2, 16, 48, 24, 13, 9, stride=2, layout="channels_last"),
    "mbconv_5x5_strided_no_bias": Case("mbconv", 1, 8, 24, 8, 6, 11, ksize=5, layout="strided", biases=False,
                                       residual=True, activations=("relu6", "relu", "relu")),
    "mbconv_1x1_map": Case("mbconv", 2, 16, 32, 16, 1, 1, residual=True),
    "dsconv_prime_residual": Case("dsconv", 2, 24, 24, 24, 11, 7, residual=True,
                                  activations=("none", "relu6", "none")),
    "dsconv_7x7_stride2": Case("dsconv", 1, 16, 16, 40, 9, 10, ksize=7, stride=2, layout="channels_last"),
    "fused_stride2": Case("fused", 1, 16, 64, 24, 9, 7, stride=2, activations=("none", "gelu_tanh", "none")),
    "fused_residual_channels_last": Case("fused", 2, 24, 72, 24, 5, 6, layout="channels_last", residual=True,
                                         activations=("none", "gelu", "silu")),
    "fused_8_input_channels_5x5": Case("fused", 1, 8, 24, 8, 7, 6, ksize=5, layout="strided", biases=False,
                                       residual=True, activations=("none", "relu", "relu6")),
    # Wider projections: 80 outputs on the narrow tiles; 136, 300 and 130 (behind a full conv) on the wide tiles in
    # fp16/bf16, transposed (the channels the rows of the products), and layer by layer in fp32 (more than its tiles
    # hold); 520, more than any tile holds.
    "mbconv_80_outputs_residual": Case("mbconv", 2, 16, 40, 80, 7, 7, residual=True),
    "dsconv_136_outputs_channels_last": Case("dsconv", 1, 24, 24, 136, 9, 9, layout="channels_last",
                                             residual=True, activations=("none", "relu6", "hardswish")),
    "mbconv_300_outputs_residual": Case("mbconv", 1, 8, 40, 300, 5, 6, residual=True,
                                        activations=("relu", "hardswish", "gelu")),
    "mbconv_520_outputs": Case("mbconv", 1, 8, 16, 520, 3, 5, activations=("relu", "relu6", "none")),
    "fused_130_outputs_stride2": Case("fused", 1, 20, 20, 130, 9, 7, stride=2,
                                      activations=("none", "gelu_tanh", "none")),
    # GLUMBConv (GLU mode): Sana's channels-last view of token-major data, stride 2 with another gate, wide
    # projections.
    "glumbconv_sana_channels_last": Case("mbconv", 2, 16, 80, 16, 6, 5, layout="channels_last",
                                         activations=GLUMBCONV, gate="silu"),
    "glumbconv_residual": Case("mbconv", 1, 8, 24, 8, 11, 9, residual=True, activations=GLUMBCONV, gate="silu"),
    "glumbconv_stride2_5x5_no_bias": Case("mbconv", 2, 8, 40, 12, 9, 6, ksize=5, stride=2, biases=False,
                                          activations=("hardswish", "relu", "none"), gate="gelu_tanh"),
    "glumbconv_wide_projection_residual": Case("mbconv", 2, 16, 48, 80, 5, 7, residual=True, activations=GLUMBCONV,
                                          gate="silu"),
    "glumbconv_wide_projection_channels_last": Case("mbconv", 1, 24, 40, 136, 4, 7, layout="channels_last",
                                               activations=("silu", "none", "relu"), gate="silu"),
    # A gated full conv: the gate in eager after the conv's kernel (the depthwise kernel gates the others).
    "glumbconv_full_conv": Case("fused", 1, 16, 40, 8, 6, 5, activations=("none", "relu", "none"), gate="silu"),
    # No projection (w3 None): the block ends with the (gated) depthwise conv, written in x's layout.
    "mbconv_stride2_no_projection": Case("mbconv", 2, 16, 64, 64, 9, 9, stride=2, projection=False,
                                                   activations=("relu", "relu", "none")),
    "mbconv_channels_last_no_projection": Case("mbconv", 1, 8, 40, 40, 7, 6, layout="channels_last",
                                                         projection=False),
    "glumbconv_no_projection": Case("mbconv", 1, 8, 48, 24, 5, 7, activations=GLUMBCONV, gate="silu",
                                    projection=False),
}


def _inputs(case: Case, dtype: torch.dtype) -> tuple[tuple, dict]:
    """(positional tensors, keyword arguments) of conv_block for ``case`` in ``dtype``."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE)

    k = case.ksize
    x = in_layout(randn(case.batch, case.channels, case.height, case.width), case.layout)
    w1 = randn(case.hidden, case.channels, 1, 1, scale=case.channels ** -0.5) if case.kind == "mbconv" else None
    width = case.hidden if case.kind != "dsconv" else case.channels
    if case.kind == "fused":
        w2, groups = randn(case.hidden, case.channels, k, k, scale=(case.channels * k * k) ** -0.5), 1
    else:
        w2, groups = randn(width, 1, k, k, scale=1 / k), None
    projected = width // 2 if case.gate else width
    w3 = randn(case.out_channels, projected, 1, 1, scale=projected ** -0.5) if case.projection else None
    b1, b2, b3 = ((randn(n) if case.biases else None) for n in (width if w1 is not None else 0, width,
                                                                 case.out_channels))
    b1 = b1 if w1 is not None else None
    b3 = b3 if w3 is not None else None
    out_hw = [(n + 2 * (k // 2) - k) // case.stride + 1 for n in (case.height, case.width)]
    residual = in_layout(randn(case.batch, case.out_channels, *out_hw), case.layout) if case.residual else None
    cast = [None if t is None else t.to(dtype) for t in (x, w1, b1, w2, b2, w3, b3, residual)]
    kwargs = {"stride": case.stride, "groups": groups, "activations": case.activations, "residual": cast[-1],
              "gate": case.gate}
    return tuple(cast[:-1]), kwargs


def _terms(args: tuple) -> int:
    """The longest chain of sums behind one output: the expand (if any), the k×k conv and the projection."""
    _, w1, _, w2, _, w3, _ = args
    return sum(0 if w is None else w[0].numel() for w in (w1, w2, w3))


def _double(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    r = kwargs["residual"]
    return tuple(None if t is None else t.double() for t in args), {**kwargs, "residual": None if r is None
                                                                     else r.double()}


@pytest.fixture(autouse=True)
def tiny_grids_take_the_kernel(request, monkeypatch):
    """The cases' grids are a few tiles, which on a GPU would run layer by layer (fewer tiles than SMs: see
    test_a_grid_of_fewer_tiles_than_sms_runs_layer_by_layer); here they take the kernel wherever it applies. The
    GPU tests run the released shapes as dispatched."""
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setattr(triton_common, "SMS", 0)


def _takes_the_kernel(case: Case, dtype: torch.dtype) -> bool:
    if not case.projection or case.gate is not None or (case.kind == "fused" and case.channels < 16):
        return False
    return case.out_channels <= (128 if dtype == torch.float32 else 256 if case.kind == "fused" else 512)


@pytest.mark.parametrize("name", CASES)
def test_launches_of_each_path(name):
    """A DSConv or MBConv whose output channels one program holds: d never stored, the depthwise conv and the
    projection one launch (after the expand's, channels-last). Every other block: one conv_bn_act launch per conv its
    kernels take (expand, spatial, projection; not a projection with nothing to fuse), the tensors between them
    channels-last, the block's output in the block's layout."""
    case = CASES[name]
    args, kwargs = _inputs(case, torch.bfloat16)
    meta_args = tuple(None if t is None else t.to("meta") for t in args)
    residual = kwargs["residual"]
    meta_kwargs = {**kwargs, "residual": None if residual is None else residual.to("meta")}
    with predict.recorded_launches() as launches:
        out = conv_block(*meta_args, **meta_kwargs, backend="triton")
    if _takes_the_kernel(case, torch.bfloat16):
        *expand, launch = launches
        assert [e.kernel for e in expand] == (["_conv_dense_kernel"] if case.kind == "mbconv" else [])
        assert all(e.scalars["o_sc"] == 1 for e in expand)  # h channels-last: 16-byte loads along the channels
        assert launch.kernel == "_conv_project_fwd_kernel" and len(launch.grid) == 1
        assert launch.constexprs["DEPTHWISE"] == (case.kind != "fused")
        assert launch.constexprs["PIXELS_ON_N"] == (case.out_channels > 128)  # 32-pixel tiles, still on wgmma
        assert launch.scalars["out_channels"] == out.shape[1] and launch.scalars["has_residual"] == case.residual
        assert launch.scalars["o_sc"] == out.stride(1)
        return
    # conv_bn_act's kernels take a full 3×3 conv of 16 input channels or more (the others run on its reference)
    if case.kind == "fused":
        spatial = ["_conv_dense_kernel"] if case.channels >= 16 else []
    else:
        spatial = ["_conv_dw_kernel"]
    # a projection with no bias, activation or residual is a plain GEMM: PyTorch's conv (nothing to fuse)
    plain_projection = not case.biases and case.activations[2] == "none" and not case.residual
    expected = (["_conv_dense_kernel"] if case.kind == "mbconv" else []) + spatial + \
        (["_conv_dense_kernel"] if case.projection and not plain_projection else [])
    assert [launch.kernel for launch in launches] == expected
    for launch in launches:  # GLU mode: the depthwise kernel writes the gated half of its conv's channels
        if launch.kernel == "_conv_dw_kernel":
            assert launch.constexprs["GATE"] == case.gate
            assert launch.scalars["channels"] == (case.hidden // 2 if case.gate else case.hidden)
    between, last = (launches, None) if plain_projection else (launches[:-1], launches[-1])
    assert all(launch.scalars["o_sc"] == 1 for launch in between)  # channels-last: 16-byte stores and loads
    assert last is None or last.scalars["o_sc"] == out.stride(1)
    assert out.is_contiguous(memory_format=torch.channels_last if case.layout == "channels_last"
                             else torch.contiguous_format)


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", CASES)
def test_within_twice_eager_error(poisoned_empty, name, dtype):
    args, kwargs = _inputs(CASES[name], dtype)
    out = conv_block(*args, **kwargs, backend="triton")
    eager = conv_block(*args, **kwargs, backend="torch")
    expected = conv_block(*_double(args, kwargs)[0], **_double(args, kwargs)[1], backend="torch")
    assert out.dtype == dtype and out.shape == eager.shape and out.stride() == eager.stride()
    assert torch.isfinite(out).all()
    assert_within_twice_eager(out, eager, expected, dtype, _terms(args))


def test_reference_is_the_three_layers():
    args, kwargs = _inputs(CASES["mbconv_7x7_residual"], torch.float64)
    x, w1, b1, w2, b2, w3, b3 = args
    h = nn.functional.hardswish(nn.functional.conv2d(x, w1, b1))
    h = nn.functional.hardswish(nn.functional.conv2d(h, w2, b2, padding=1, groups=w2.shape[0]))
    expected = nn.functional.conv2d(h, w3, b3) + kwargs["residual"]
    torch.testing.assert_close(conv_block(*args, **kwargs, backend="torch"), expected)


@pytest.mark.parametrize("name, position", [("mbconv_7x7_residual", 0), ("dsconv_prime_residual", 1),
                                            ("dsconv_prime_residual", 2)])
def test_every_activation(poisoned_empty, name, position):
    """The expand's activation on conv_bn_act's kernel, the depthwise conv's and the projection's on the DSConv
    kernel's."""
    for activation in ACTIVATIONS:
        activations = ["none", "none", "none"]
        activations[position] = activation
        case = dataclasses.replace(CASES[name], batch=1, activations=tuple(activations))
        args, kwargs = _inputs(case, torch.float32)
        expected = conv_block(*_double(args, kwargs)[0], **_double(args, kwargs)[1], backend="torch")
        out = conv_block(*args, **kwargs, backend="triton")
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5, msg=activation)


@pytest.mark.parametrize("name", ["mbconv_520_outputs", "fused_8_input_channels_5x5",
                                  "dsconv_136_outputs_channels_last", "glumbconv_residual", "glumbconv_no_projection"])
def test_blocks_off_the_kernel_say_why_once(poisoned_empty, caplog, monkeypatch, name):
    args, kwargs = _inputs(CASES[name], torch.float32)
    x, w1, _, w2, _, w3, _ = args
    groups = kwargs["groups"] if kwargs["groups"] is not None else w2.shape[0]
    block = ConvBlockArgs(x, w1, None, "none", w2, None, "none", [CASES[name].stride] * 2, [w2.shape[2] // 2] * 2,
                          groups, w3, None, "none", gate=kwargs["gate"])
    config, why = _whole_block_config(block)
    assert config is None and why
    monkeypatch.setattr(dispatch, "_LOGGED", set())  # the message is logged once per process
    with caplog.at_level(logging.INFO, logger="evit_kernels"):
        conv_block(*args, **kwargs, backend="triton")
        conv_block(*args, **kwargs, backend="triton")
    assert caplog.text.count("layer by layer") == 1 and why in caplog.text


def test_a_projection_with_nothing_to_fuse_runs_on_pytorchs_conv(poisoned_empty, caplog, monkeypatch):
    """A 1×1 projection with no bias, activation or residual (diffusers' GLUMBConv) is a plain GEMM: PyTorch's conv,
    saying why once; the block's other layers stay on the kernels, and the result is the reference's."""
    case = dataclasses.replace(CASES["glumbconv_sana_channels_last"], biases=False)
    args, kwargs = _inputs(case, torch.float32)
    monkeypatch.setattr(dispatch, "_LOGGED", set())
    with caplog.at_level(logging.INFO, logger="evit_kernels"):
        with predict.recorded_launches() as launches:
            conv_block(*(None if t is None else t.to("meta") for t in args), **kwargs, backend="triton")
        out = conv_block(*args, **kwargs, backend="triton")
    assert [launch.kernel for launch in launches] == ["_conv_dense_kernel", "_conv_dw_kernel"]
    assert caplog.text.count("PyTorch's conv for a 1×1 conv with no bias, activation or residual") == 1
    expected = conv_block(*_double(args, kwargs)[0], **_double(args, kwargs)[1], backend="torch")
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last)


def _meta_mbconv(batch: int, channels: int, hidden: int, out_channels: int, size: int) -> ConvBlockArgs:
    def meta(*shape):
        return torch.empty(*shape, device="meta", dtype=torch.bfloat16)

    return ConvBlockArgs(meta(batch, channels, size, size), meta(hidden, channels, 1, 1), None, "none",
                         meta(hidden, 1, 3, 3), None, "none", [1, 1], [1, 1], hidden, meta(out_channels, hidden, 1, 1),
                         None, "none")


@pytest.mark.parametrize("out_channels, pixels_per_tile", [(128, 64), (256, 32)])
def test_a_grid_of_fewer_tiles_than_sms_runs_layer_by_layer(monkeypatch, out_channels, pixels_per_tile):
    """One program holds every output channel of its pixel tile, so a grid smaller than the GPU (batch 1 on a
    7×7 to 28×28 map) would leave SMs idle; layer by layer the kernels split it finer."""
    sms = predict.GPUS["h100"].sms
    monkeypatch.setattr(triton_common, "SMS", sms)
    size = 8
    full_wave = sms * pixels_per_tile // (size * size)  # images whose pixels make exactly `sms` tiles
    config, why = _whole_block_config(_meta_mbconv(full_wave, 64, 256, out_channels, size))
    assert config is not None and config["P"] == pixels_per_tile and why == ""
    config, why = _whole_block_config(_meta_mbconv(full_wave - 1, 64, 256, out_channels, size))
    assert config is None and f"fewer than an H100's {sms} SMs" in why


def test_an_expanded_tensor_beyond_32_bit_offsets_runs_layer_by_layer():
    """The kernel reads h, which the op's own checks (x, weights, output) do not see."""
    block = _meta_mbconv(1, 16, 128, 16, 4096)  # h: 128 × 4096 × 4096 = 2^31 elements; x and the output 2^28
    config, why = _whole_block_config(block)
    assert config is None and "2^31" in why
    config, _ = _whole_block_config(_meta_mbconv(1, 16, 64, 16, 4096))  # h: 2^30
    assert config is not None


def test_a_grouped_spatial_conv_runs_layer_by_layer():
    """The kernel computes a depthwise conv (groups = width) or a full one (groups 1), nothing in between."""
    def meta(*shape):
        return torch.empty(*shape, device="meta", dtype=torch.bfloat16)

    def block(groups):
        return ConvBlockArgs(meta(64, 32, 16, 16), None, None, "none", meta(64, 32 // groups, 3, 3), None, "none",
                             [1, 1], [1, 1], groups, meta(32, 64, 1, 1), None, "none")

    assert _whole_block_config(block(1))[0]["DEPTHWISE"] is False
    config, why = _whole_block_config(block(2))
    assert config is None and "grouped spatial conv (groups 2" in why


def test_reference_gradients_after_triton_forward():
    args, kwargs = _inputs(CASES["dsconv_prime_residual"], torch.float32)
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (*args, kwargs["residual"])]
    conv_block(*leaves[:-1], **{**kwargs, "residual": leaves[-1]}, backend="triton").sum().backward()  # stride 0
    exact = [None if t is None else t.detach().double().requires_grad_() for t in (*args, kwargs["residual"])]
    conv_block(*exact[:-1], **{**kwargs, "residual": exact[-1]}, backend="torch").sum().backward()
    for got, ref in zip(leaves, exact):
        if got is not None:
            torch.testing.assert_close(got.grad.double(), ref.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["mbconv_7x7_residual", "glumbconv_sana_channels_last",
                                  "glumbconv_no_projection"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend, name):
    args, kwargs = _inputs(CASES[name], torch.float32)
    x, w1, b1, w2, b2, w3, b3 = (None if t is None else t.requires_grad_() for t in args)
    act1, act2, act3 = kwargs["activations"]
    op_args = (x, w1, b1, act1, w2, b2, act2, [1, 1], [1, 1], w2.shape[0], w3, b3, act3, kwargs["residual"],
               kwargs["gate"], backend)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if DEVICE == "cpu" and backend == "triton":  # the interpreter cannot read the storage AOT tracing hands it
        tests = tests[:-1]
    torch.library.opcheck(torch.ops.evit.conv_block.default, op_args, test_utils=tests)


def test_invalid_arguments_raise_clear_errors():
    args, kwargs = _inputs(CASES["mbconv_7x7_residual"], torch.float32)
    x, w1, b1, w2, b2, w3, b3 = args
    with pytest.raises(ValueError, match="w1 must be"):
        conv_block(x, w1[:, :8], b1, w2, b2, w3, b3)
    with pytest.raises(ValueError, match="does not take the 64 channels"):
        conv_block(x, w1, b1, w2[:32], b2, w3, b3)
    with pytest.raises(ValueError, match="w3 must be"):
        conv_block(x, w1, b1, w2, b2, w3[:, :8], b3)
    with pytest.raises(ValueError, match="without w3 there is none"):
        conv_block(x, w1, b1, w2, b2, None, b3)
    with pytest.raises(ValueError, match="without w3 there is none"):
        conv_block(x, w1, b1, w2, b2, None, None, residual=kwargs["residual"])
    with pytest.raises(ValueError, match="b2 must have shape"):
        conv_block(x, w1, b1, w2, b3, w3, b3)
    with pytest.raises(ValueError, match="residual has shape"):
        conv_block(x, w1, b1, w2, b2, w3, b3, residual=kwargs["residual"][:, :, :2])
    with pytest.raises(ValueError, match="unknown activation"):
        conv_block(x, w1, b1, w2, b2, w3, b3, activations=("relu", "swish", "none"))
    with pytest.raises(TypeError, match="w3 has dtype"):
        conv_block(x, w1, b1, w2, b2, w3.half(), b3)


def test_float64_is_refused_on_request_and_passed_over_under_auto(pretend_measured):
    args, kwargs = _inputs(CASES["dsconv_prime_residual"], torch.float64)
    with pytest.raises(dispatch.BackendUnavailable, match="float64"):
        conv_block(*args, **kwargs, backend="triton")
    pretend_measured("conv_block", "triton")
    torch.testing.assert_close(conv_block(*args, **kwargs), conv_block(*args, **kwargs, backend="torch"))


# --- the drop-in module ------------------------------------------------------------------------------------------

def _timm_mbconv(residual=True, stride=1):
    block = timm_mit.MBConv(16, 16 if residual else 24, stride=stride, expand_ratio=4, use_bias=(True, True, False),
                            norm_layer=(None, None, nn.BatchNorm2d), act_layer=(nn.Hardswish, nn.Hardswish, None))
    return timm_mit.ResidualBlock(block, nn.Identity() if residual else None)


def _timm_dsconv():
    return timm_mit.ResidualBlock(timm_mit.DSConv(16, 16, act_layer=(nn.Hardswish, None)), nn.Identity())


def _timm_fused_mbconv():
    block = timm_mit.FusedMBConv(16, 16, expand_ratio=4, act_layer=(GELUTanh, None))
    return timm_mit.ResidualBlock(block, nn.Identity())


def mit_han_lab():
    """mit-han-lab's blocks as the PyPI package efficientsam ships them, imported where used: a machine without the
    package (the GPU machine, before its carried wheels are installed) still runs this file's kernel tests."""
    return pytest.importorskip("efficientsam.models.nn.ops")


def _mit_han_lab_mbconv():
    block = mit_han_lab().MBConv(16, 16, expand_ratio=6, use_bias=(True, True, False), norm=(None, None, "bn2d"),
                               act_func=("gelu", "gelu", None))
    return mit_han_lab().ResidualBlock(block, mit_han_lab().IdentityLayer())


def _mit_han_lab_fused_mbconv_stride2():
    block = mit_han_lab().FusedMBConv(16, 32, stride=2, expand_ratio=4, act_func=("gelu", None))
    return mit_han_lab().ResidualBlock(block, None)


BUILDERS = {"timm_mbconv": _timm_mbconv, "timm_mbconv_downsample": lambda: _timm_mbconv(False, 2),
            "timm_dsconv": _timm_dsconv, "timm_fused_mbconv": _timm_fused_mbconv,
            "mit_han_lab_mbconv": _mit_han_lab_mbconv, "mit_han_lab_fused_mbconv_s2": _mit_han_lab_fused_mbconv_stride2}


@pytest.mark.parametrize("patch_children", [False, True], ids=["plain", "children_patched"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", BUILDERS)
@torch.no_grad()
def test_module_matches_original_in_eval(name, backend, patch_children, op_runs):
    original = BUILDERS[name]().to(DEVICE)
    randomize_untrained_state(original)
    original.eval()
    block = copy.deepcopy(original)
    if patch_children:  # what patch() does to the ConvNormAct / ConvLayer layers inside
        for layer_name, layer in list(block.main.named_children()):
            setattr(block.main, layer_name, FusedConvNormAct(layer))
    fused = FusedConvBlock(block, backend=backend).eval()
    x = in_layout(torch.randn(2, 16, 7, 5, device=DEVICE), "channels_last")
    torch.testing.assert_close(fused(x), original(x), rtol=1e-5, atol=1e-5)
    assert op_runs == [("conv_block", backend)]
    assert fused.state_dict().keys() == original.state_dict().keys()


@pytest.mark.parametrize("name", ["timm_mbconv", "mit_han_lab_mbconv", "mit_han_lab_fused_mbconv_s2"])
def test_under_autocast_the_output_dtype_is_the_originals(name, op_runs):
    """An fp32 input is the shortcut of a bf16 branch: the original's sum is fp32, and so is the op's, the shortcut
    its residual as it is; a block without a shortcut gives the branch's bf16. One op call either way."""
    original = BUILDERS[name]().to(DEVICE)
    randomize_untrained_state(original)
    fused = FusedConvBlock(copy.deepcopy(original.eval()))
    x = torch.randn(2, 16, 6, 5, device=DEVICE)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        expected, got = original(x), fused(x)
    assert got.dtype == expected.dtype and rel_err(got, expected) < 2e-2
    assert [op for op, _ in op_runs] == ["conv_block"]


@pytest.mark.parametrize("name", BUILDERS)
def test_module_matches_original_in_training(name, monkeypatch):
    """Batch statistics: the original's layers run, the op never does, and gradients and BN buffers match."""
    monkeypatch.setattr(fused_module_file, "conv_block", lambda *args, **kwargs: pytest.fail("op called"))
    original = BUILDERS[name]().to(DEVICE)
    randomize_untrained_state(original)
    original.train()
    fused = FusedConvBlock(copy.deepcopy(original)).train()
    x = torch.randn(4, 16, 6, 5, device=DEVICE)
    outputs = []
    for module in (original, fused):
        y = module(x)
        y.square().sum().backward()
        outputs.append(y)
    torch.testing.assert_close(outputs[1], outputs[0])
    assert_same_grads_and_buffers(original, fused)


def test_folded_weights_follow_parameter_updates(op_runs):
    original = _timm_mbconv().to(DEVICE)
    randomize_untrained_state(original)
    fused = FusedConvBlock(copy.deepcopy(original)).eval()
    original.eval()
    x = torch.randn(1, 16, 5, 5, device=DEVICE)
    with torch.no_grad():
        fused(x)
        for module in (original, fused):
            module.main.point_conv.norm.running_mean.add_(0.5)
            module.main.inverted_conv.conv.weight.mul_(1.5)
        torch.testing.assert_close(fused(x), original(x), rtol=1e-5, atol=1e-5)
    assert [op for op, _ in op_runs] == ["conv_block", "conv_block"]


@pytest.mark.parametrize("build, reason", [
    (lambda: timm_mit.ResidualBlock(timm_mit.MBConv(16, 16), nn.Conv2d(16, 16, 1)), "not an identity"),
    (lambda: timm_mit.ResidualBlock(timm_mit.MBConv(16, 16), nn.Identity(), nn.BatchNorm2d(16)), "pre_norm"),
    (lambda: mit_han_lab().ResidualBlock(mit_han_lab().MBConv(16, 16), mit_han_lab().IdentityLayer(), post_act="relu"),
     "post_act"),
    (lambda: with_child(_timm_mbconv(), "main.depth_conv.norm", nn.GroupNorm(1, 64)), "BatchNorm2d"),
    (lambda: with_child(_timm_mbconv(), "main.depth_conv.act", nn.Tanh()), "activation"),
    (lambda: with_child(_timm_mbconv(), "main.inverted_conv.conv", nn.Conv2d(16, 64, 3, padding=1)), "1×1"),
    (lambda: with_child(_timm_dsconv(), "main.depth_conv.conv", nn.Conv2d(16, 16, 3, padding=1, groups=4)), "groups 4"),
    (lambda: with_child(_timm_mbconv(), "main.extra", nn.ReLU()), "children"),
])
def test_refuses_what_it_cannot_compute(build, reason):
    with pytest.raises(Unsupported, match=reason):
        FusedConvBlock(build())


# --- on a GPU: the released models' block shapes ---------------------------------------------------------------

# B1 stage-3 / stage-4 MBConv, B1 stem DSConv, B1 stage-1 MBConv at 1024×2048 (a 512-wide map), L1 stage-2
# FusedMBConv, L2 stage-4 MBConv (512 → 3072 → 512), SAM-L0 neck FusedMBConv, downsampling MBConv (stride 2): each
# batch makes at least a wave of tiles, so every block takes the spatial-conv-and-projection kernel (B1's stage-4 and
# L2's MBConvs and SAM-L0's FusedMBConv on the wide, transposed tiles in fp16/bf16); at batch 1, B1's stage-4 MBConv
# runs layer by layer, and so does Sana 600M's GLUMBConv at 1024 px (the gate in the depthwise kernel, the bias-free
# projection on PyTorch's conv).
GPU_CASES = {
    "b1_mbconv_s3": Case("mbconv", 64, 128, 512, 128, 14, 14, residual=True),
    "b1_mbconv_s4": Case("mbconv", 128, 256, 1024, 256, 7, 7, residual=True),
    "b1_mbconv_s4_batch1": Case("mbconv", 1, 256, 1024, 256, 7, 7, residual=True),
    "b1_dsconv_stem": Case("dsconv", 8, 16, 16, 16, 112, 112, residual=True, activations=("none", "hardswish", "none")),
    "b1_mbconv_s1_1024x2048": Case("mbconv", 1, 32, 128, 32, 256, 512, residual=True),
    "l1_fusedmbconv_s2": Case("fused", 8, 64, 256, 64, 56, 56, residual=True,
                              activations=("none", "gelu_tanh", "none")),
    "l2_mbconv_s4": Case("mbconv", 128, 512, 3072, 512, 7, 7, residual=True,
                         activations=("gelu_tanh", "gelu_tanh", "none")),
    "sam_l0_neck_fusedmbconv": Case("fused", 4, 256, 256, 256, 32, 32, layout="channels_last", residual=True,
                                    activations=("none", "gelu_tanh", "none")),
    "b1_mbconv_downsample": Case("mbconv", 64, 64, 256, 128, 28, 28, stride=2, biases=True),
    "sana_600m_glumbconv": Case("mbconv", 1, 1152, 5760, 1152, 32, 32, layout="channels_last", biases=False,
                                activations=GLUMBCONV, gate="silu"),
}


@pytest.mark.numerics
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", GPU_CASES)
def test_released_block_shapes_within_twice_eager_error(poisoned_empty, name, dtype):
    args, kwargs = _inputs(GPU_CASES[name], dtype)
    out = conv_block(*args, **kwargs, backend="triton")
    eager = conv_block(*args, **kwargs, backend="torch")
    expected = conv_block(*_double(args, kwargs)[0], **_double(args, kwargs)[1], backend="torch")
    assert out.dtype == dtype and out.shape == eager.shape and out.stride() == eager.stride()
    assert torch.isfinite(out).all()
    assert_within_twice_eager(out, eager, expected, dtype, _terms(args))


def test_patch_swaps_every_conv_block_of_efficientvit_b0_and_reports_nothing_else():
    model = timm.create_model("efficientvit_b0", num_classes=10)
    randomize_untrained_state(model)
    model.eval()
    patched = copy.deepcopy(model)
    report = evit_kernels.patch(patched)
    blocks = [m for m in model.modules() if type(m).__name__ == "ResidualBlock" and type(m.main).__name__ in
              ("MBConv", "DSConv", "FusedMBConv")]
    assert report.counts()["timm.models.efficientvit_mit.ResidualBlock -> FusedConvBlock"] == len(blocks) > 0
    assert not report.skipped, "ResidualBlocks around LiteMLA are not conv-block material: no noise"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(patched(x), model(x), rtol=1e-4, atol=1e-4)
