"""The runs of adjacent pixels (and LiteMLA's tokens) the kernels tell the compiler of (``_common.pixel_run``,
``Heads.token_run``), and the heads LiteMLA's one-pass kernel reads and writes as one flat run each
(``Heads.whole_rows``): the claim, checked element by element against the address arithmetic of the kernels' flat
pixel and token numbering for the layouts below, and the launches that make it.

The interpreter ignores these hints, and on a GPU a false one would store whole runs at wrong addresses; so the claim
itself is what is tested here, for every layout the ops accept."""

from __future__ import annotations

import itertools

import pytest
import torch

from evit_kernels import predict
from evit_kernels.ops.conv_bn_act import conv_bn_act
from evit_kernels.ops.ffn import ffn
from evit_kernels.triton import _common as common
from evit_kernels.triton import relu_linear_attention

BLOCKS = (16, 32, 64)


def _maps():
    """(name, tensor) of every kind of layout a kernel's output or residual can have."""
    yield "nchw_14x14", torch.empty(2, 3, 14, 14)
    yield "nchw_28x28", torch.empty(1, 2, 28, 28)
    yield "nchw_7x7", torch.empty(2, 3, 7, 7)
    yield "nchw_4x5", torch.empty(3, 2, 4, 5)
    yield "nchw_1x12_row", torch.empty(2, 3, 1, 12)
    yield "nchw_12x1_column", torch.empty(2, 3, 12, 1)
    yield "channels_last_14x14", torch.empty(2, 3, 14, 14).contiguous(memory_format=torch.channels_last)
    yield "channels_last_1_channel", torch.empty(2, 1, 4, 4).contiguous(memory_format=torch.channels_last)
    yield "channel_slice_odd_offset", torch.empty(2, 7, 4, 4)[:, 1:5]
    yield "channel_stride_odd", torch.empty(2, 3, 4, 5)[..., :4]  # rows of 4 in rows of 5: not dense
    yield "image_slice_of_odd_images", torch.empty(3, 3, 5, 4)[:, :, 1:]  # 4×4 images 60 elements apart
    yield "broadcast_channels", torch.empty(2, 1, 4, 4).expand(2, 3, 4, 4)
    yield "broadcast_everything", torch.empty(1, 1, 1, 1).expand(2, 3, 4, 4)
    yield "wide_rows_padded", torch.empty(2, 3, 4, 20)[..., :16]
    yield "padded_channel_planes", torch.empty(2 * 3 * 208).as_strided((2, 3, 14, 14), (624, 208, 14, 1))
    yield "padded_images", torch.empty(2 * 40).as_strided((2, 2, 4, 4), (40, 16, 4, 1))


MAPS = dict(_maps())


def _claim_holds(t: torch.Tensor, block: int, run: int) -> bool:
    """Whether, for every pixel p of the flat numbering (b, y, x) over the tiles that cover the map (masked pixels
    beyond it included: the kernels compute their addresses too) and every channel (two masked ones beyond them
    too), the pixels of each run
    run·j … run·j + run - 1 are at adjacent element offsets starting at a multiple of run, and all inside the map
    or all outside it."""
    batch, channels, height, width = t.shape
    s_b, s_c, s_h, s_w = t.stride()
    n_pixels = batch * height * width
    covered = -(-n_pixels // block) * block
    for start, c in itertools.product(range(0, covered, run), range(channels + 2)):
        at = []
        for p in range(start, start + run):
            b, y, x = p // (height * width), (p % (height * width)) // width, p % width
            at.append(b * s_b + c * s_c + y * s_h + x * s_w)
        inside = {p < n_pixels for p in range(start, start + run)}
        if at != list(range(at[0], at[0] + run)) or at[0] % run or len(inside) != 1:
            return False
    return True


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("name", MAPS)
def test_the_run_claimed_holds_element_by_element(name, block):
    t = MAPS[name]
    run = common.pixel_run(block, t)
    assert run in (1, *common.RUNS) and block % run == 0
    assert _claim_holds(t, block, run)


def test_runs_are_claimed_where_rows_are_dense():
    """The rule is not trivially 1: NCHW maps of even side get their runs (a broadcast over the channels, and one
    channel in channels_last, which torch lays out as NCHW, too), the others none (an odd side, channels last, a
    broadcast pixel, rows not dense, and rows of a multiple of 16, whose runs the JIT proves itself); a run holds
    only if it holds for every map given (output and residual)."""
    runs = {name: common.pixel_run(64, t) for name, t in MAPS.items()}
    assert runs == {"nchw_14x14": 4, "nchw_28x28": 16, "nchw_7x7": 1, "nchw_4x5": 4, "nchw_1x12_row": 4,
                    "nchw_12x1_column": 4, "channels_last_14x14": 1, "channels_last_1_channel": 16,
                    "channel_slice_odd_offset": 16, "channel_stride_odd": 1, "image_slice_of_odd_images": 4,
                    "broadcast_channels": 16, "broadcast_everything": 1, "wide_rows_padded": 1,
                    "padded_channel_planes": 4, "padded_images": 4}
    assert common.pixel_run(16, MAPS["nchw_28x28"]) == 16 and common.pixel_run(8, MAPS["nchw_28x28"]) == 4
    # rows of a multiple of 16 with strides of multiples of 16: the JIT proves the runs itself, no hint
    assert common.run_length(64, 256, (1,), (256, 512), False) == 16
    assert common.run_length(64, 256, (1,), (256, 512), True) == 1
    assert common.pixel_run(64, torch.empty(2, 2, 16, 16)) == 1
    assert common.pixel_run(64, torch.empty(2, 2, 4, 16)[:, :, :, :12]) == 1  # rows not dense: no run at all
    planes_of_788 = torch.empty(2 * 788).as_strided((1, 2, 28, 28), (1576, 788, 28, 1))
    assert common.pixel_run(64, planes_of_788) == 4
    assert common.pixel_run(64, MAPS["nchw_28x28"], planes_of_788) == 4
    assert common.pixel_run(64, MAPS["nchw_14x14"], MAPS["channels_last_14x14"]) == 1


def _run_of(launches, kernel):
    return next(launch.constexprs["PIXEL_RUN"] for launch in launches if launch.kernel == kernel)


@pytest.mark.parametrize("layout, run", [("nchw", 4), ("channels_last", 1)])
def test_convs_launch_with_the_runs_of_their_output_and_residual(layout, run):
    """14×14 maps: the groups-1 kernel, split or not, the depthwise one and the FFN take runs of 4 in NCHW, none in
    channels_last; a residual in the other layout takes them away."""
    fmt = torch.contiguous_format if layout == "nchw" else torch.channels_last

    def launches(in_channels, groups, residual_format=fmt):
        x = torch.empty(1, in_channels, 14, 14, dtype=torch.bfloat16, device="meta").contiguous(memory_format=fmt)
        weight = torch.empty(256, in_channels // groups, 1 if groups == 1 else 3, 1 if groups == 1 else 3,
                             dtype=torch.bfloat16, device="meta")
        residual = torch.empty(1, 256, 14, 14, dtype=torch.bfloat16, device="meta").contiguous(
            memory_format=residual_format)
        with predict.recorded_launches() as recorded:
            conv_bn_act(x, weight, None, residual=residual, activation="none", backend="triton",
                        padding=weight.shape[2] // 2, groups=groups)
        return recorded

    assert _run_of(launches(256, 1), "_conv_dense_kernel") == run
    split = launches(1024, 1)  # 56 quarter tiles over 1024 channels: split 4 ways, the partial sums in the layout
    assert split[0].grid[1] > 1 and _run_of(split, "_conv_dense_kernel") == run
    assert _run_of(launches(256, 256), "_conv_dw_kernel") == run
    other = torch.channels_last if layout == "nchw" else torch.contiguous_format
    assert _run_of(launches(256, 1, other), "_conv_dense_kernel") == 1
    x = torch.empty(1, 192, 14, 14, dtype=torch.bfloat16, device="meta").contiguous(memory_format=fmt)
    w1, w2 = (torch.empty(*shape, 1, 1, dtype=torch.bfloat16, device="meta") for shape in ((384, 192), (192, 384)))
    with predict.recorded_launches() as recorded:
        ffn(x, w1, None, w2, None, residual=torch.empty_like(x), backend="triton")
    assert _run_of(recorded, "_ffn_fwd_kernel") == run


def _token_claim_holds(strides: list[tuple[tuple[int, ...], int]], n_tokens: int, block: int, run: int) -> bool:
    """:func:`_claim_holds` for tokens: each tensor's (other strides, token stride), its other indices taken up to 3
    each, tokens over the tiles of ``block`` that cover ``n_tokens``."""
    covered = -(-n_tokens // block) * block
    for others, step in strides:
        for index in itertools.product(range(3), repeat=len(others)):
            base = sum(i * s for i, s in zip(index, others))
            for start in range(0, covered, run):
                at = [base + n * step for n in range(start, start + run)]
                inside = {n < n_tokens for n in range(start, start + run)}
                if at != list(range(at[0], at[0] + run)) or at[0] % run or len(inside) != 1:
                    return False
    return True


@pytest.mark.parametrize("block", (16, 32, 64))
@pytest.mark.parametrize("name", ["nchw_14x14", "nchw_28x28", "nchw_7x7", "channels_last_14x14",
                                  "channel_slice_odd_offset", "image_slice_of_odd_images", "padded_channel_planes"])
def test_the_token_run_claimed_holds_element_by_element(name, block):
    """LiteMLA's heads (batch, head, role, channel strides, and the token's) over a map of each layout, with an NCHW
    output of its shape: the run :meth:`Heads.token_run` claims holds for both."""
    src = MAPS[name]
    dim = 1  # every channel its own head's: the channel-major strides are then the map's own
    heads = relu_linear_attention.channel_major(src, dim)
    out = torch.empty(src.shape[0], 2 * src.shape[1], *src.shape[2:])
    out_strides = relu_linear_attention._token_strides(out)
    run = heads.token_run(block, out_strides)
    # the tiles start at multiples of the run: chunks are whole multiples of every token tile
    per_chunk, _ = relu_linear_attention._chunking(heads.n_tokens, 1)
    assert per_chunk % block == 0 and block % run == 0
    assert _token_claim_holds([(heads.strides[:4], heads.strides[4]), (out_strides[:2], out_strides[2])],
                              heads.n_tokens, block, run)
    # runs of 16 the JIT proves itself from the strides and token counts it specializes as multiples of 16
    assert run == {"nchw_14x14": 4, "nchw_28x28": 1, "nchw_7x7": 1, "channels_last_14x14": 1,
                   "channel_slice_odd_offset": 1, "image_slice_of_odd_images": 4,
                   "padded_channel_planes": 4}[name]


def test_lite_mla_launches_with_the_runs_of_its_tokens():
    """NCHW maps of 14×14 take runs of 4 in the attention and the aggregated scale's kernels, split or not;
    channels_last maps and Sana's token-major q, k, v (as its projections leave them) none where they are read."""
    def runs(side, batch=1, fmt=torch.contiguous_format):
        qkv = torch.empty(batch, 3 * 4 * 16, side, side, dtype=torch.bfloat16, device="meta").contiguous(
            memory_format=fmt)
        dw = torch.empty(3 * 4 * 16, 1, 5, 5, dtype=torch.bfloat16, device="meta")
        pw = torch.empty(3 * 4 * 16, 16, 1, 1, dtype=torch.bfloat16, device="meta")
        with predict.recorded_launches() as launches:
            relu_linear_attention.forward_aggregated(qkv, [(dw, None, pw, None)], 16, 1e-15)
        return {launch.kernel: launch.constexprs.get("TOKEN_RUN") for launch in launches}

    assert runs(14, batch=128) == {"_rla_fwd_one_pass_kernel": 4, "_rla_agg_fwd_one_pass_kernel": 4}
    assert runs(14) == {"_rla_fwd_reduce_kernel": 4, "_rla_fwd_apply_kernel": 4, "_rla_agg_fwd_reduce_kernel": None,
                        "_rla_agg_fwd_apply_kernel": 4}
    # a channels_last qkv: none where it is read, but the aggregated scale's apply is told only of the output's
    # tokens (always NCHW)
    assert runs(14, fmt=torch.channels_last) == {"_rla_fwd_reduce_kernel": 1, "_rla_fwd_apply_kernel": 1,
                                                 "_rla_agg_fwd_reduce_kernel": None, "_rla_agg_fwd_apply_kernel": 4}
    q = torch.empty(1, 196, 4 * 16, dtype=torch.bfloat16, device="meta")
    heads = relu_linear_attention.token_major(q, q, q, 16)
    assert heads.token_run(64, relu_linear_attention.token_major_strides(q)) == 1


def _whole_maps():
    """(name, qkv map of 2 heads of 16 channels) for each layout :meth:`Heads.whole_rows` must tell apart."""
    channels = 3 * 2 * 16
    yield "nchw_7x7", torch.empty(2, channels, 7, 7)
    yield "nchw_4x5", torch.empty(3, channels, 4, 5)
    yield "nchw_8x8", torch.empty(2, channels, 8, 8)  # 64 tokens: the JIT proves the runs of 16 itself
    yield "nchw_9x9", torch.empty(1, channels, 9, 9)  # 81 tokens: the 128-token tile of 16-channel heads
    yield "nchw_12x12", torch.empty(1, channels, 12, 12)  # 144 tokens: more than the widest tile
    yield "channels_last_7x7", torch.empty(2, channels, 7, 7).contiguous(memory_format=torch.channels_last)
    yield "channel_slice_odd_offset", torch.empty(2, channels + 2, 7, 7)[:, 1:channels + 1]
    yield "image_slice_of_odd_images", torch.empty(2, channels + 1, 7, 7)[:, :channels]
    yield "padded_channel_planes", torch.empty(2 * channels * 52).as_strided((2, channels, 7, 7),
                                                                              (channels * 52, 52, 7, 1))


WHOLE_MAPS = dict(_whole_maps())


def _whole_claim_holds(strides: tuple[int, ...], shape: tuple[int, ...], span: int, dim: int, n_tokens: int) -> bool:
    """Whether, for every leading index (batch, head, role: ``shape``, their ``strides``), the ``dim`` channels × the
    tokens at channel stride ``strides[-2]`` and token stride ``strides[-1]`` lie at base + c·n_tokens + n (what the
    one-pass kernel's flat loads and stores take them at), the run [base, base + dim·n_tokens) inside the tensor's
    ``span`` elements and base a multiple of 16."""
    *leading, stride_c, stride_n = strides
    for index in itertools.product(*map(range, shape)):
        base = sum(i * s for i, s in zip(index, leading))
        at = [base + c * stride_c + n * stride_n for c in range(dim) for n in range(n_tokens)]
        if at != list(range(base, base + dim * n_tokens)) or base % 16 or base + dim * n_tokens > span:
            return False
    return True


@pytest.mark.parametrize("name", WHOLE_MAPS)
def test_the_whole_heads_claimed_hold_element_by_element(name):
    """Each role of each head of the map, and each head of an NCHW output, is one dense run from a multiple of 16
    wherever :meth:`Heads.whole_rows` claims it; and it claims it for NCHW maps of at most 128 tokens (heads of 16
    channels) that are no multiple of 16, not for the other layouts."""
    dim, src = 16, WHOLE_MAPS[name]
    heads = relu_linear_attention.channel_major(src, dim)  # fp32: its 16-channel heads build whole
    out = torch.empty(src.shape[0], 2 * src.shape[1] // 3, *src.shape[2:])
    out_strides = relu_linear_attention._token_strides(out)
    rows = heads.whole_rows(dim, out_strides)
    assert rows == {"nchw_7x7": 16, "nchw_4x5": 16, "nchw_9x9": 16}.get(name, 0)
    if rows:
        stride_b, stride_h, stride_role, stride_c, stride_n = heads.strides
        span = src.untyped_storage().nbytes() // src.element_size() - src.storage_offset()
        assert _whole_claim_holds((stride_b, stride_h, stride_role, stride_c, stride_n),
                                  (heads.batch, heads.heads, 3), span, dim, heads.n_tokens)
        out_b, out_c, out_n = out_strides
        assert _whole_claim_holds((out_b, dim * out_c, out_c, out_n), (heads.batch, 2 * heads.heads), out.numel(),
                                  dim, heads.n_tokens)


def test_the_whole_heads_need_a_build_that_does_not_spill():
    """fp32 heads of 32 channels keep the token tiles (their whole build spills); 16 channels and the rotated form
    as the rule says; heads of 8 channels on a 7×7 map start at odd multiples of 8 elements: no claim."""
    def rows(dim, dtype):
        src = torch.empty(2, 3 * 2 * dim, 7, 7, dtype=dtype, device="meta")
        out_strides = relu_linear_attention._token_strides(torch.empty(2, 2 * 2 * dim, 7, 7, device="meta"))
        return relu_linear_attention.channel_major(src, dim).whole_rows(dim, out_strides)

    assert [rows(32, torch.bfloat16), rows(32, torch.float16), rows(32, torch.float32)] == [32, 32, 0]
    assert [rows(16, torch.float32), rows(8, torch.bfloat16)] == [16, 0]
    # the 128-token tile only at 16 channels: 8-channel heads on a 10×10 map are aligned runs (800 elements) too
    src = torch.empty(1, 3 * 2 * 8, 10, 10, dtype=torch.bfloat16, device="meta")
    out_strides = relu_linear_attention._token_strides(torch.empty(1, 2 * 2 * 8, 10, 10, device="meta"))
    assert relu_linear_attention.channel_major(src, 8).whole_rows(8, out_strides) == 0
    src = torch.empty(1, 3 * 16, 7, 7, device="meta")
    rotated = relu_linear_attention.channel_major(src, 16)._replace(rotated_q=src, rotated_k=src)
    assert rotated.whole_rows(16, relu_linear_attention._token_strides(torch.empty(1, 16, 7, 7))) == 0


def test_lite_mla_launches_with_its_heads_whole_on_7x7_maps():
    """On an NCHW 7×7 map the one-pass kernels read each head whole (64-token tile, no token runs), on a 9×9 one in a
    128-token tile; a channels_last map and a 14×14 one keep the token tiles."""
    def launched(side, fmt=torch.contiguous_format, batch=8):
        qkv = torch.empty(batch, 3 * 4 * 16, side, side, dtype=torch.bfloat16, device="meta").contiguous(
            memory_format=fmt)
        dw = torch.empty(3 * 4 * 16, 1, 5, 5, dtype=torch.bfloat16, device="meta")
        pw = torch.empty(3 * 4 * 16, 16, 1, 1, dtype=torch.bfloat16, device="meta")
        with predict.recorded_launches() as launches:
            relu_linear_attention.forward_aggregated(qkv, [(dw, None, pw, None)], 16, 1e-15)
        return {launch.kernel: (launch.constexprs.get("WHOLE_ROWS"), launch.constexprs["BLOCK_N"])
                for launch in launches}

    assert launched(7) == {"_rla_fwd_one_pass_kernel": (16, 64), "_rla_agg_fwd_one_pass_kernel": (16, 64)}
    with common.without_on_chip_gathers():  # the token tiles, for a GPU to time beside the whole heads
        assert launched(7) == {"_rla_fwd_one_pass_kernel": (0, 64), "_rla_agg_fwd_one_pass_kernel": (0, 64)}
    # 81 tokens make one chunk where the programs are many (at batch 8, two chunks: the two passes, no whole heads)
    assert launched(9, batch=128) == {"_rla_fwd_one_pass_kernel": (16, 128), "_rla_agg_fwd_one_pass_kernel": (16, 128)}
    assert launched(7, torch.channels_last)["_rla_fwd_one_pass_kernel"] == (0, 64)
    assert launched(14) == {"_rla_fwd_reduce_kernel": (None, 64), "_rla_fwd_apply_kernel": (None, 64),
                            "_rla_agg_fwd_reduce_kernel": (None, 64), "_rla_agg_fwd_apply_kernel": (None, 64)}
