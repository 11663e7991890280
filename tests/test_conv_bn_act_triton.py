"""The Triton backend of evit::conv_bn_act (depthwise k×k, groups-1 and row-staged 3×3 kernels) against a float64
reference (on CPU through the Triton interpreter on tiny grids; on a GPU also with realistic shapes)."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import triton
from timm.layers import GELUTanh
from timm.models.efficientvit_mit import ConvNormAct
from torch import nn

from evit_kernels import dispatch, predict
from evit_kernels.nn.conv_bn_act import FusedConvNormAct
from evit_kernels.ops.conv_bn_act import ACTIVATIONS, ConvBnActArgs, conv_bn_act, conv_bn_act_reference
from evit_kernels.ops.conv_bn_act import kernel_kind as conv_kernel_kind
from evit_kernels.triton import _common as triton_common
from evit_kernels.triton import conv_bn_act as triton_conv
from tests.numerics import assert_within_twice_eager, in_layout, max_err, rounding_floor, tf32_exact

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]

# (batch, channels, H, W, k, stride, padding, bias, residual, layout): several pixel and channel blocks, prime and
# non-square maps, a 1×1 map, batch 1, explicit and asymmetric padding, per-axis strides; NCHW maps of at most 64
# pixels, whose channel planes the plane kernel takes whole (two blocks of 32 planes or five of 8, the last short;
# k = 5 on a map narrower than its taps; 64 pixels, no residual).
DEPTHWISE = {
    "k3_planes_7x7": (2, 37, 7, 7, 3, 1, 1, True, True, "nchw"),
    "k5_planes_4x5": (1, 16, 4, 5, 5, 1, 2, False, True, "nchw"),
    "k3_planes_8x8": (1, 9, 8, 8, 3, 1, 1, True, False, "nchw"),
    "k3_s1_prime_blocks": (2, 37, 11, 13, 3, 1, 1, True, True, "channels_last"),
    "k5_s2": (1, 6, 7, 9, 5, 2, 2, True, False, "nchw"),
    "k7_s2": (1, 8, 9, 6, 7, 2, 3, False, True, "channels_last"),
    "k3_map_1x1": (3, 5, 1, 1, 3, 1, 1, True, True, "strided"),  # a dense 1×1 map would take the plane kernel
    "k5_strided_input": (2, 4, 5, 8, 5, 1, 2, False, True, "strided"),
    "k3_pad0_stride_1x2": (1, 4, 6, 7, 3, (1, 2), (0, 1), True, False, "nchw"),
}
# (batch, C_in, C_out, H, W, bias, residual, layout): several M, N and K blocks, C_in < 16 (dot padding); long
# reductions on few tiles, split over the input channels (5 slices, the last one short; 8 slices over two output
# tiles) in either output layout; NCHW maps whose pixels come in runs of 16 and 4 (common.pixel_run) and of none.
POINTWISE = {
    "blocks": (2, 40, 70, 3, 5, True, True, "channels_last"),
    "small_c_in": (1, 3, 5, 7, 11, False, True, "nchw"),
    "map_1x1": (3, 17, 9, 1, 1, True, False, "channels_last"),
    "strided_input": (2, 6, 8, 5, 4, True, True, "strided"),
    "nchw_runs_of_16": (2, 12, 10, 4, 8, True, True, "nchw"),
    "split_5_slices": (1, 1540, 20, 4, 5, True, True, "nchw"),
    "split_8_slices_channels_last": (2, 2000, 36, 2, 3, False, True, "channels_last"),
}
# (batch, C_in, C_out, H, W, stride, padding, bias, residual, layout) of 3×3 convs with groups 1: an M-series stem
# layer (stride 2, odd channel counts), several M, N and K blocks, asymmetric stride and padding on a strided input.
DENSE_3X3 = {
    "stem": (2, 17, 24, 11, 9, 2, 1, True, False, "nchw"),
    "blocks": (1, 40, 70, 5, 7, 1, 1, True, True, "channels_last"),
    "stride_1x2_pad_0x1": (1, 16, 8, 6, 5, (1, 2), (0, 1), False, True, "strided"),
}

# (batch, C_in, C_out, H, W, stride, bias, residual, layout) of 3×3 padding-1 convs on the row-staged kernel: RGB
# stems on an odd map, on rows of more outputs than one program takes and more output channels than one block, at
# stride 1; 5 channels, strided; wide NCHW rows with several steps over the (channel, kernel row) pairs, at stride 1
# across two column blocks (the columns beyond each block) and at stride 2.
ROWS = {
    "rgb_s2_odd_map": (2, 3, 16, 9, 7, 2, True, False, "nchw"),
    "rgb_s2_wide_rows_channel_blocks": (1, 3, 40, 4, 262, 2, True, True, "channels_last"),
    "rgb_s1": (1, 3, 8, 5, 9, 1, True, True, "nchw"),
    "five_channels_s2_strided": (1, 5, 8, 5, 6, 2, False, True, "strided"),
    "wide_nchw_s1_pair_steps": (1, 20, 24, 3, 130, 1, True, True, "nchw"),
    "wide_nchw_s2": (1, 17, 8, 3, 200, 2, False, False, "nchw"),
}

def _inputs(batch, c_in, c_out, height, width, k, stride, padding, groups, bias, residual, layout, dtype):
    """(x, weight, bias, residual, conv kwargs); the residual is transposed in memory for strided layouts."""
    x = in_layout(torch.randn(batch, c_in, height, width, device=DEVICE), layout)
    weight = torch.randn(c_out, c_in // groups, k, k, device=DEVICE) / math.sqrt(c_in // groups * k * k)
    b = torch.randn(c_out, device=DEVICE) if bias else None
    stride, padding = ((v, v) if isinstance(v, int) else v for v in (stride, padding))
    out_hw = [(n + 2 * p - k) // s + 1 for n, p, s in zip((height, width), padding, stride)]
    r = None
    if residual:
        r = torch.randn(batch, c_out, *out_hw, device=DEVICE)
        r = r.transpose(2, 3).contiguous().transpose(2, 3) if layout == "strided" else in_layout(r, layout)
    tensors = [None if t is None else t.to(dtype) for t in (x, weight, b, r)]
    return (*tensors, dict(stride=stride, padding=padding, groups=groups))


def _depthwise_inputs(name, dtype):
    batch, channels, height, width, k, stride, padding, bias, residual, layout = DEPTHWISE[name]
    return _inputs(batch, channels, channels, height, width, k, stride, padding, channels, bias, residual, layout,
                   dtype)


def _pointwise_inputs(name, dtype):
    batch, c_in, c_out, height, width, bias, residual, layout = POINTWISE[name]
    return _inputs(batch, c_in, c_out, height, width, 1, 1, 0, 1, bias, residual, layout, dtype)


def _check_against_float64(x, weight, bias, residual, conv, activation):
    dtype = x.dtype
    out = conv_bn_act(x, weight, bias, activation=activation, residual=residual, backend="triton", **conv)
    eager = conv_bn_act(x, weight, bias, activation=activation, residual=residual, backend="torch", **conv)
    f64 = [None if t is None else t.double() for t in (x, weight, bias, residual)]
    expected = conv_bn_act_reference(ConvBnActArgs(f64[0], f64[1], f64[2], conv["stride"], conv["padding"], [1, 1],
                                                   conv["groups"], activation, f64[3]))
    assert out.dtype == dtype and out.shape == eager.shape and out.stride() == eager.stride()
    assert torch.isfinite(out).all()
    assert_within_twice_eager(out, eager, expected, dtype, weight[0].numel())


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("name", DEPTHWISE)
def test_depthwise_within_twice_eager_error(poisoned_empty, grid_tiles, name, activation, dtype):
    x, weight, bias, residual, conv = _depthwise_inputs(name, dtype)
    _check_against_float64(x, weight, bias, residual, conv, activation)


@pytest.fixture(params=["regular_tiles", "small_grid_tiles"])
def grid_tiles(request, monkeypatch):
    """Both tile sizes of the depthwise and groups-1 kernels (and both plane counts of the depthwise plane kernel): the
    tests' maps are small enough to take the small-grid tiles, so the regular ones are forced by declaring no grid
    small."""
    if request.param == "regular_tiles":
        monkeypatch.setattr(triton_common, "SMS", 0)
    return request.param


def test_depthwise_planes_are_taken_on_small_dense_nchw_maps_at_stride_1():
    """The plane kernel takes a stride-1 depthwise conv that keeps a dense NCHW map of at most 64 pixels (32 planes
    a program, 8 where that leaves SMs idle); a channels_last map, a channels_last residual, stride 2, a 9×9 map
    (81 pixels) and padding that shrinks the map keep the tile kernel."""
    def planes(batch=256, side=7, stride=1, padding=1, fmt=torch.contiguous_format, residual_fmt=None):
        x = torch.empty(batch, 64, side, side, device="meta").contiguous(memory_format=fmt)
        out_side = (side + 2 * padding - 3) // stride + 1
        out = torch.empty(batch, 64, out_side, out_side, device="meta").contiguous(memory_format=fmt)
        residual = None if residual_fmt is None else torch.empty_like(out, memory_format=residual_fmt)
        a = ConvBnActArgs(x, torch.empty(64, 1, 3, 3, device="meta"), None, [stride, stride], [padding, padding],
                          [1, 1], 64, "none", residual)
        return triton_conv.dw_planes(a, out)

    assert planes() == 32 and planes(batch=1) == 8 and planes(side=8, residual_fmt=torch.contiguous_format) == 32
    assert planes(fmt=torch.channels_last) is None and planes(residual_fmt=torch.channels_last) is None
    assert planes(stride=2) is None and planes(side=9) is None and planes(padding=0) is None
    with triton_common.without_on_chip_gathers():  # the tile kernel, for a GPU to time beside it
        assert planes() is None
    assert planes() == 32

    def launched():
        x = torch.empty(256, 64, 7, 7, dtype=torch.bfloat16, device="meta")
        with predict.recorded_launches() as launches:
            conv_bn_act(x, torch.empty(64, 1, 3, 3, dtype=torch.bfloat16, device="meta"), None, activation="none",
                        residual=torch.empty_like(x), backend="triton", padding=1, groups=64)
        return [(launch.kernel, launch.grid) for launch in launches]

    assert launched() == [("_conv_dw_planes_kernel", (256, 2))]
    with triton_common.without_on_chip_gathers():
        assert [kernel for kernel, _ in launched()] == ["_conv_dw_kernel"]


def test_small_grids_take_quarter_size_tiles():
    assert triton_conv.dense_blocks(7 * 7, 256, 512, 1, 1000.0) == triton_conv.DENSE_SMALL_GRID_BLOCKS  # batch 1, 7×7
    assert triton_conv.dense_blocks(7 * 7, 256, 512, 3, 1.0) == triton_conv.DENSE_SMALL_GRID_BLOCKS
    assert triton_conv.dense_blocks(256 * 14 * 14, 256, 512, 1, 1.0) == triton_conv.DENSE_BLOCKS
    assert triton_conv.dw_blocks(7 * 7, 1024) == triton_conv.DW_SMALL_GRID_BLOCKS  # 32 regular tiles, 128 small
    assert triton_conv.dw_blocks(14 * 14, 2048) == triton_conv.DW_BLOCKS  # 4 × 64 regular tiles
    assert triton_conv.dw_blocks(4 * 4, 384) == triton_conv.DW_BLOCKS  # one tile of pixels either way
    assert triton_conv.dw_blocks(256 * 7 * 7, 1024) == triton_conv.DW_BLOCKS
    # the groups-1 kernel's quarter tiles run on 8 warps (each program's loads in flight set a small grid's pace)
    for batch, warps in ((1, 8), (256, 4)):
        launches = _dense_launches(batch, 512, 7, 256, 1, torch.bfloat16)
        assert launches[0].options["num_warps"] == warps


def test_long_reductions_on_few_tiles_split_over_the_input_channels():
    """docs/performance.md, "Split-K": batch-1 projections on 7×7 and 14×14 maps split, into as many slices as
    bring the programs to about 4 × 132; as many tiles as SMs or shorter reductions do not, nor does a 3×3 conv."""
    quarter, regular = triton_conv.DENSE_SMALL_GRID_BLOCKS, triton_conv.DENSE_BLOCKS
    assert triton_conv.dense_splits(32, 3072, quarter) == 12  # L1 stage 4: 49 pixels × 512 outputs from 3072 channels
    assert triton_conv.dense_splits(24, 1536, quarter) == 6  # B2 stage 4: 49 × 384 from 1536
    assert triton_conv.dense_splits(56, 1536, quarter) == 6  # 196 × 256 from 1536
    assert triton_conv.dense_splits(56, 1024, quarter) == 4  # L2 stage 3: 196 × 256 from 1024, 16 steps
    assert triton_conv.dense_splits(112, 4096, quarter) == 4  # L3 stage 3: 196 × 512 from 4096, up to 4 · 132 programs
    assert triton_conv.dense_splits(200, 1024, quarter) == 1  # 784 × 256 from 1024 (B1 at 16): enough tiles
    assert triton_conv.dense_splits(16, 1024, quarter) == 4  # B1 stage 4: 49 × 256 from 1024
    assert triton_conv.dense_splits(24, 768, quarter) == 3  # B2's stride-2 stage-4 block: 49 × 384 from 768
    assert triton_conv.dense_splits(16, 512, quarter) == 1  # 49 × 256 from 512: too short to gain a second launch
    assert triton_conv.dense_splits(32, 2100, quarter) == 7  # 33 steps: 8 slices of 5 steps would leave the last empty
    assert triton_conv.dense_splits(16, 8192, quarter) == 16  # at most 16
    # Past the SMs' count, up to twice it, only reductions of at least 4096 channels split:
    assert triton_conv.dense_splits(160, 6144, quarter) == 3  # L3 stage 4 at 384 px: 144 × 1024 from 6144, 160 tiles
    assert triton_conv.dense_splits(192, 1024, quarter) == 1  # L3's qkv conv at 224 px: 49 × 3072 from 1024
    assert triton_conv.dense_splits(270, 6144, quarter) == 1  # more than 2 · 132 tiles
    # regular tiles, 2 to 5 of whose split programs fit an SM: 128 steps of 32, 2 · 200 programs ≤ 4 · 132
    assert triton_conv.dense_splits(200, 4096, regular) == 2

    def launched(c_in, c_out, k, side=7):
        x = torch.empty(1, c_in, side, side, dtype=torch.bfloat16, device="meta")
        weight = torch.empty(c_out, c_in, k, k, dtype=torch.bfloat16, device="meta")
        with predict.recorded_launches() as launches:
            conv_bn_act(x, weight, None, padding=k // 2, activation="relu", backend="triton")
        return [(launch.kernel, launch.grid) for launch in launches]

    assert launched(3072, 512, 1) == [("_conv_dense_kernel", (32, 12)), ("_split_sum_kernel", (1568,))]
    assert launched(2100, 512, 1) == [("_conv_dense_kernel", (32, 7)), ("_split_sum_kernel", (1568,))]
    assert launched(3072, 512, 3) == [("_conv_dense_kernel", (32, 1))]
    assert launched(512, 512, 1) == [("_conv_dense_kernel", (32, 1))]
    # 144 pixels × 1024 outputs: 5 × 32 quarter tiles (48 regular ones are fewer than the SMs), 96 steps each
    assert launched(6144, 1024, 1, side=12) == [("_conv_dense_kernel", (160, 3)), ("_split_sum_kernel", (2304,))]


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("name", POINTWISE)
def test_pointwise_within_twice_eager_error(poisoned_empty, grid_tiles, name, activation, dtype):
    x, weight, bias, residual, conv = _pointwise_inputs(name, dtype)
    _check_against_float64(x, weight, bias, residual, conv, activation)


@pytest.mark.parametrize("name, run", [("nchw_runs_of_16", 16), ("split_5_slices", 4), ("small_c_in", 1),
                                       ("blocks", 1)])
def test_pointwise_cases_launch_with_their_pixel_runs(name, run):
    """The cases above exercise every run of adjacent pixels the epilogue can be told of (tests/test_pixel_runs.py
    checks the claim itself; the interpreter ignores it)."""
    x, weight, bias, residual, conv = _pointwise_inputs(name, torch.bfloat16)
    on_meta = [None if t is None else t.to("meta") for t in (x, weight, bias, residual)]
    with predict.recorded_launches() as launches:
        conv_bn_act(*on_meta[:3], residual=on_meta[3], activation="none", backend="triton", **conv)
    assert launches[0].constexprs["PIXEL_RUN"] == run


@pytest.mark.parametrize("batch, in_channels, size, out_channels, ksize, dtype, block_m", [
    (1, 1024, 10, 6144, 1, torch.bfloat16, 32),  # L3's expand at 320 px, batch 1: 2 × 96 regular tiles, 90 FLOPs/B
    (1, 1024, 12, 6144, 1, torch.bfloat16, 32),  # at 384 px: 3 × 96 regular tiles, 124 FLOPs per byte
    (16, 1024, 14, 256, 1, torch.bfloat16, 32),  # L2's projection at batch 16: 49 × 4 regular tiles, 192 FLOPs/B
    (1, 1024, 16, 3072, 1, torch.bfloat16, 32),  # 4 × 48 regular tiles, 192 FLOPs per byte in bf16
    (1, 2048, 28, 256, 1, torch.bfloat16, 32),  # L3's projection at 224 px: 13 × 4 regular tiles, 176 FLOPs/B
    (1, 1024, 16, 3072, 1, torch.float32, 32),  # the same in fp32: 96 FLOPs per byte
    (1, 1024, 12, 8960, 1, torch.bfloat16, 64),  # 3 × 140 regular tiles, not well under a wave (124 FLOPs/B)
    (1, 16, 12, 6144, 3, torch.bfloat16, 64),  # a 3×3 conv: 3 × 96 regular tiles at 72 FLOPs per byte
])
def test_a_memory_bound_gemm_under_a_wave_takes_quarter_size_tiles(batch, in_channels, size, out_channels, ksize,
                                                                    dtype, block_m):
    """Where the regular tiles make fewer than 3 × 132 programs, a 1×1 conv takes the quarter-size tiles if its
    FLOPs per byte moved (the products over the input, weights and output, worked out by hand for each case above)
    are at most 250, the regular ones otherwise; a k×k conv keeps the regular ones."""
    launches = _dense_launches(batch, in_channels, size, out_channels, ksize, dtype)
    assert [launch.kernel for launch in launches] == ["_conv_dense_kernel"]
    assert launches[0].constexprs["BLOCK_M"] == block_m


@pytest.mark.parametrize("batch, size, in_channels, out_channels, block_m, splits", [
    (4, 16, 3072, 512, 64, 4),  # SAM-L0's stage-4 projections at batch 4: 307 FLOPs/B, 128 regular tiles, 768 a slice
    (4, 16, 2048, 512, 64, 4),  # 293 FLOPs per byte, 128 regular tiles, slices of 512
    (4, 16, 1920, 512, 32, 1),  # 290 FLOPs per byte, 128 regular tiles, slices of 480
    (4, 16, 1024, 512, 32, 1),  # SAM-L0's attention projections: 256 FLOPs per byte, slices of 256 channels
])
def test_a_compute_bound_gemm_on_few_tiles_keeps_wgmma_tiles_where_a_split_fills_the_sms(batch, size, in_channels,
                                                                                       out_channels, block_m, splits):
    """A 1×1 conv of more than 250 FLOPs per byte (worked out by hand) whose regular tiles are fewer than 132 keeps
    them where their split, into as many slices as bring its programs to 4 × 132, leaves at least 512 channels a
    slice; otherwise it takes the quarter-size tiles (here too many of them to split)."""
    launches = _dense_launches(batch, in_channels, size, out_channels, 1, torch.bfloat16)
    assert launches[0].constexprs["BLOCK_M"] == block_m
    assert launches[0].grid[1] == splits
    assert [launch.kernel for launch in launches[1:]] == (["_split_sum_kernel"] if splits > 1 else [])


def _dense_launches(batch, in_channels, size, out_channels, ksize, dtype):
    x = torch.empty(batch, in_channels, size, size, device="meta", dtype=dtype)
    weight = torch.empty(out_channels, in_channels, ksize, ksize, device="meta", dtype=dtype)
    with predict.recorded_launches() as launches:
        conv_bn_act(x, weight, None, activation="none", backend="triton", stride=1, padding=ksize // 2, groups=1)
    return launches


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_split_on_regular_tiles_within_twice_eager_error(poisoned_empty, monkeypatch, dtype):
    """A split on regular 64 × 64 tiles (steps of 32 channels), which the long-reduction rule takes on 133 to 264
    tiles, computes the same sums: the regular tiles are forced on a map small enough to split, and the launch
    checked to be that one."""
    monkeypatch.setattr(triton_conv, "dense_blocks", lambda *args: triton_conv.DENSE_BLOCKS)
    x, weight, bias, residual, conv = _pointwise_inputs("split_5_slices", dtype)
    on_meta = [t.to("meta") for t in (x, weight, bias, residual)]
    with predict.recorded_launches() as launches:
        conv_bn_act(*on_meta[:3], residual=on_meta[3], activation="gelu_tanh", backend="triton", **conv)
    assert launches[0].constexprs["BLOCK_M"] == triton_conv.DENSE_BLOCKS["BLOCK_M"]
    assert launches[0].constexprs["SPLIT_K"] and launches[0].grid[1] > 1
    _check_against_float64(x, weight, bias, residual, conv, "gelu_tanh")


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("activation", ["none", "relu"])
@pytest.mark.parametrize("name", DENSE_3X3)
def test_dense_3x3_within_twice_eager_error(poisoned_empty, grid_tiles, name, activation, dtype):
    batch, c_in, c_out, height, width, stride, padding, bias, residual, layout = DENSE_3X3[name]
    x, weight, bias, residual, conv = _inputs(batch, c_in, c_out, height, width, 3, stride, padding, 1, bias, residual,
                                              layout, dtype)
    _check_against_float64(x, weight, bias, residual, conv, activation)


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("activation", ["none", "hardswish", "gelu_tanh"])
@pytest.mark.parametrize("name", ROWS)
def test_rows_within_twice_eager_error(poisoned_empty, name, activation, dtype):
    x, weight, bias, residual, conv = _rows_inputs(name, dtype)
    assert conv_kernel_kind(ConvBnActArgs(x, weight, bias, list(conv["stride"]), [1, 1], [1, 1], 1, activation,
                                          residual)) == "rows"
    _check_against_float64(x, weight, bias, residual, conv, activation)


def _rows_inputs(name, dtype):
    batch, c_in, c_out, height, width, stride, bias, residual, layout = ROWS[name]
    return _inputs(batch, c_in, c_out, height, width, 3, stride, 1, 1, bias, residual, layout, dtype)


def test_rows_cases_cover_several_programs_channel_blocks_and_pair_steps():
    """Else the cases test nothing the first one does not."""
    _, _, c_out, _, width, *_ = ROWS["rgb_s2_wide_rows_channel_blocks"]
    assert (width + 1) // 2 > triton_conv.ROWS_BLOCK_P and c_out > triton_conv.ROWS_BLOCK_N
    _, c_in, _, _, width, *_ = ROWS["wide_nchw_s1_pair_steps"]
    assert width > triton_conv.ROWS_BLOCK_P and 3 * c_in > 3 * triton_conv.ROWS_PAIRS


@pytest.mark.parametrize("c_in, width, stride, layout, kind, kind_without_gathers", [
    (3, 224, 2, "channels_last", "rows", "rows"),  # an image, in any layout: no other kernel takes it
    (32, 112, 1, "nchw", "rows", "dense"),  # the L-series stem block's convs
    (8, 112, 1, "nchw", "rows", "rows"),  # too few channels for the implicit GEMM's taps: the row kernel still
    (32, 112, 1, "channels_last", "dense", "dense"),  # channels contiguous: the implicit GEMM reads them 16 bytes wide
    (16, 112, 2, "nchw", "dense", "dense"),  # 56 outputs per row: mostly idle programs
])
def test_rows_kernel_takes_images_and_wide_nchw_rows(c_in, width, stride, layout, kind, kind_without_gathers):
    """Without on-chip gathers (the alternative a GPU times) the wide NCHW rows go to the implicit GEMM where it takes
    the conv; no conv loses its kernel."""
    x = in_layout(torch.empty(1, c_in, 4, width, device="meta"), layout)
    args = ConvBnActArgs(x, torch.empty(8, c_in, 3, 3, device="meta"), None, [stride] * 2, [1, 1], [1, 1], 1, "none",
                         None)
    assert conv_kernel_kind(args) == kind
    with triton_common.without_on_chip_gathers():
        assert conv_kernel_kind(args) == kind_without_gathers


# exp(-y) overflowing to inf is how silu and tanh-GELU saturate to -0 for very negative y (numpy warns on it).
@pytest.mark.numerics
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_large_activations_stay_finite_in_fp16():
    # Pre-activations far outside the exp/erf ranges: silu and the GELUs must give 0 or y, never NaN.
    x, weight, bias, residual, conv = _pointwise_inputs("small_c_in", torch.float16)
    x = x * 200
    for activation in ("gelu", "gelu_tanh", "silu", "hardswish"):
        _check_against_float64(x, weight, bias, residual, conv, activation)


@pytest.mark.parametrize("build", [
    lambda: ConvNormAct(8, 8, 3, groups=8, act_layer=nn.Hardswish),
    lambda: ConvNormAct(8, 8, 5, stride=2, groups=8, act_layer=GELUTanh),
    lambda: ConvNormAct(8, 20, 1, act_layer=nn.ReLU),
    lambda: ConvNormAct(8, 20, 1, act_layer=None),
], ids=["dw3_hardswish", "dw5_s2_gelu_tanh", "pw_relu", "pw_norm_only"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@torch.no_grad()
def test_fused_module_matches_timm_block(build, layout):
    original = build().to(DEVICE)
    for bn in original.modules():  # a fresh BatchNorm hides folding mistakes
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2.0), bn.weight.normal_(), bn.bias.normal_()
    original.eval()
    fused = FusedConvNormAct(copy.deepcopy(original), backend="triton").eval()
    x = in_layout(torch.randn(2, 8, 9, 7, device=DEVICE), layout)
    torch.testing.assert_close(fused(x), original(x), rtol=1e-5, atol=1e-5)


def _kind_inputs(kind: str, depthwise: str, pointwise: str):
    """fp32 inputs of one case of each kernel."""
    if kind == "rows":
        return _rows_inputs("wide_nchw_s1_pair_steps", torch.float32)
    return (_depthwise_inputs(depthwise, torch.float32) if kind == "depthwise"
            else _pointwise_inputs(pointwise, torch.float32))


@pytest.mark.parametrize("kind", ["depthwise", "pointwise", "rows"])
def test_reference_gradients_after_triton_forward(kind):
    x, weight, bias, residual, conv = _kind_inputs(kind, "k5_s2", "blocks")
    residual = residual if residual is not None else torch.randn_like(
        conv_bn_act(x, weight, bias, backend="torch", **conv))
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias, residual)]
    conv_bn_act(leaves[0], leaves[1], leaves[2], activation="gelu", residual=leaves[3], backend="triton",
                **conv).sum().backward()  # a stride-0 grad_output
    exact = [t.detach().double().requires_grad_() for t in (x, weight, bias, residual)]
    conv_bn_act_reference(ConvBnActArgs(exact[0], exact[1], exact[2], conv["stride"], conv["padding"], [1, 1],
                                        conv["groups"], "gelu", exact[3])).sum().backward()
    for got, ref in zip(leaves, exact):
        torch.testing.assert_close(got.grad.double(), ref.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["depthwise", "pointwise", "rows"])
def test_opcheck_triton_backend(kind):
    x, weight, bias, residual, conv = _kind_inputs(kind, "k3_s1_prime_blocks", "blocks")
    x, weight, bias, residual = (t.requires_grad_() for t in (x, weight, bias, residual))
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if DEVICE == "cpu":  # the interpreter cannot read the storage of the tensors AOT tracing hands the kernel
        tests = tests[:-1]
    args = (x, weight, bias, list(conv["stride"]), list(conv["padding"]), [1, 1], conv["groups"], "silu", residual,
            "triton")
    torch.library.opcheck(torch.ops.evit.conv_bn_act.default, args, test_utils=tests)


def _conv_args(c_in=4, c_out=4, k=3, groups=4, stride=1, padding=1, dilation=1, dtype=torch.float32):
    x = torch.randn(1, c_in, 6, 5, device=DEVICE, dtype=dtype)
    weight = torch.randn(c_out, c_in // groups, k, k, device=DEVICE, dtype=dtype)
    return dict(x=x, weight=weight, stride=stride, padding=padding, dilation=dilation, groups=groups)


UNSUPPORTED = {
    "dense_k5": (dict(groups=1, k=5, padding=2), "3×3 conv with groups 1"),
    "dense_k3_rgb_stride3": (dict(c_in=3, c_out=8, groups=1, stride=3), "at least 16 input channels"),
    "rows_six_channels": (dict(c_in=6, c_out=8, groups=1, stride=2), "at most 5 input channels"),
    "rows_padding0": (dict(c_in=3, c_out=8, groups=1, stride=2, padding=0), "padding 1"),
    "grouped": (dict(c_in=4, c_out=6, groups=2), "depthwise"),
    "depthwise_k9": (dict(k=9, padding=4), "depthwise"),
    "depthwise_k1": (dict(k=1, padding=0), "depthwise"),
    "depthwise_stride3": (dict(stride=3), "depthwise"),
    "pointwise_stride2": (dict(k=1, groups=1, stride=2, padding=0), "1×1"),
    "pointwise_padded": (dict(k=1, groups=1, padding=1), "1×1"),
    "dilation2": (dict(dilation=2, padding=2), "dilation"),
    "float64": (dict(dtype=torch.float64), "float64"),
}


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_unsupported_inputs_raise_on_request_and_fall_back_under_auto(name, pretend_measured):
    change, reason = UNSUPPORTED[name]
    args = _conv_args(**change)
    with pytest.raises(dispatch.BackendUnavailable, match=reason):
        conv_bn_act(**args, activation="relu", backend="triton")
    pretend_measured("conv_bn_act", "triton")  # so that "auto" considers it: it must pass these inputs over
    out = conv_bn_act(**args, activation="relu")
    torch.testing.assert_close(out, conv_bn_act(**args, activation="relu", backend="torch"))


def test_measured_backend_is_chosen_under_auto_for_supported_inputs(pretend_measured):
    pretend_measured("conv_bn_act", "triton")
    args = _conv_args()
    conv = [args["x"], args["weight"], None, [1, 1], [1, 1], [1, 1], 4, "relu", None]
    assert dispatch.choose(ConvBnActArgs(*conv)).name == "triton"


def test_refuses_tensors_beyond_32_bit_indexing():
    x = torch.zeros(1, 1, 1, 1, device=DEVICE).expand(1, 2**15, 2**8, 2**8)  # 2^31 elements, no memory
    weight = torch.randn(2**15, 1, 3, 3, device=DEVICE)
    with pytest.raises(dispatch.BackendUnavailable, match="2\\^31"):
        dispatch.choose(ConvBnActArgs(x, weight, None, [1, 1], [1, 1], [1, 1], 2**15, "relu", None), "triton")


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU tensors")
def test_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    args = _conv_args()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reasons = dispatch.get("conv_bn_act", "triton").input_reasons(
        ConvBnActArgs(args["x"], args["weight"], None, [1, 1], [1, 1], [1, 1], 4, "relu", None))
    assert any("cpu" in r for r in reasons)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", ["depthwise", "small_grid_depthwise", "pointwise", "split_projection"])
def test_realistic_shapes_on_gpu(poisoned_empty, kind, dtype):
    # EfficientViT-B1 stage 3 at 224 px, batch 8: a 5×5 depthwise and a 256 → 1024 expansion.
    if kind == "depthwise":
        x, weight, bias, residual, conv = _inputs(8, 256, 256, 14, 14, 5, 1, 2, 256, True, True, "channels_last",
                                                  dtype)
    elif kind == "small_grid_depthwise":  # EfficientViT-B1 stage 4 at batch 1: 7×7, 1024 channels, 16-pixel tiles
        x, weight, bias, residual, conv = _inputs(1, 1024, 1024, 7, 7, 3, 1, 1, 1024, True, True, "channels_last",
                                                  dtype)
    elif kind == "pointwise":
        x, weight, bias, residual, conv = _inputs(8, 256, 1024, 14, 14, 1, 1, 0, 1, True, True, "nchw", dtype)
    else:  # EfficientViT-L1 stage 4 at batch 1: a 3072 → 512 projection on a 7×7 map, split 12 ways
        x, weight, bias, residual, conv = _inputs(1, 3072, 512, 7, 7, 1, 1, 0, 1, True, True, "channels_last", dtype)
    _check_against_float64(x, weight, bias, residual, conv, "hardswish")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["pointwise", "dense_3x3", "split_projection", "rows_stem"])
def test_tf32_products_of_tf32_values_are_exact_on_gpu(poisoned_empty, kind):
    """fp32 convs where PyTorch allows cuDNN TF32 (its default; the other tests turn it off), so the kernel
    multiplies on TF32 tensor cores. On inputs TF32 holds exactly, every product is exact however the hardware
    rounds its operands, so the result must be as close to float64 as fp32 accumulation allows: a wrong TF32 build,
    or operands narrowed further (bf16 keeps 7 bits), fails."""
    if kind == "rows_stem":  # an RGB stem on 224-pixel rows: the row-staged kernel
        x, weight, bias, residual, conv = _inputs(2, 3, 16, 224, 224, 3, 2, 1, 1, True, False, "nchw", torch.float32)
    elif kind == "pointwise":  # EfficientViT-B1 stage 3 at batch 8: 256 → 1024
        x, weight, bias, residual, conv = _inputs(8, 256, 1024, 14, 14, 1, 1, 0, 1, True, True, "nchw", torch.float32)
    elif kind == "dense_3x3":  # a 3×3 groups-1 conv of 32 channels (EfficientViT-M's stem)
        x, weight, bias, residual, conv = _inputs(4, 32, 64, 28, 28, 3, 2, 1, 1, True, True, "nchw", torch.float32)
    else:  # EfficientViT-L1 stage 4 at batch 1: a 3072 → 512 projection on a 7×7 map, split over its channels
        x, weight, bias, residual, conv = _inputs(1, 3072, 512, 7, 7, 1, 1, 0, 1, True, True, "channels_last",
                                                  torch.float32)
    x, weight = tf32_exact(x), tf32_exact(weight)
    torch.backends.cudnn.allow_tf32 = True  # the autouse fixture restores IEEE's setting for the next test
    assert triton_common.dot_mode(torch.float32, "conv")["PRECISION"] == "tf32"
    out = conv_bn_act(x, weight, bias, activation="hardswish", residual=residual, backend="triton", **conv)
    f64 = [None if t is None else t.double() for t in (x, weight, bias, residual)]
    expected = conv_bn_act_reference(ConvBnActArgs(*f64[:3], conv["stride"], conv["padding"], [1, 1], 1,
                                                   "hardswish", f64[3]))
    assert torch.isfinite(out).all()
    assert max_err(out, expected) <= rounding_floor(expected, torch.float32, weight[0].numel())


def test_host_ceil_division_and_powers_of_two_match_triton():
    """The launchers' host-side ``cdiv`` and ``next_power_of_2`` (plain arithmetic, for speed) give what Triton's own
    functions give, over every size up to a few thousand."""
    for a in range(1, 3000):
        assert triton_common.next_power_of_2(a) == triton.next_power_of_2(a)
        for b in (1, 3, 16, 32, 49, 64, 128):
            assert triton_common.cdiv(a, b) == triton.cdiv(a, b)


def test_dot_mode_follows_the_dtype_pytorch_and_the_interpreter(monkeypatch):
    """docs/ops.md, "Tensor-core products": low precision straight to the tensor cores (bf16 upcast only where the
    interpreter runs it), fp32 as PyTorch's setting for the op the products replace says (cuDNN's for convolutions,
    cuBLAS's for matmuls; tests/test_fp32_precision.py checks how those settings are read)."""
    dot_mode = triton_common.dot_mode
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for op in ("conv", "matmul"):
        assert dot_mode(torch.bfloat16, op) == dot_mode(torch.float16, op) == {"PRECISION": "ieee", "UPCAST": False}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dot_mode(torch.bfloat16, "conv")["UPCAST"] and not dot_mode(torch.float16, "conv")["UPCAST"]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    matmul_default = torch.backends.cuda.matmul.allow_tf32
    try:  # the autouse fixture restores cuDNN's setting
        for conv_tf32, matmul_tf32 in itertools.product((False, True), repeat=2):
            torch.backends.cudnn.allow_tf32 = conv_tf32
            torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
            assert dot_mode(torch.float32, "conv")["PRECISION"] == ("tf32" if conv_tf32 else "ieee")
            assert dot_mode(torch.float32, "matmul")["PRECISION"] == ("tf32" if matmul_tf32 else "ieee")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_default
