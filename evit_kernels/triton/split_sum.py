"""Split reductions for small grids (docs/performance.md, "Split-K"): where a kernel's output tiles would occupy few
of the GPU's SMs while each walks a long reduction, the reduction is split into slices, each slice's programs write
fp32 partial sums to their own copy of the output, and ``_split_sum_kernel`` adds the slices and applies the
epilogue (bias, activation, residual, one rounding). The sum is one fixed reduction tree over the slices, so it is
the same on every run. conv_bn_act's 1×1 convs split their input channels, the FFN its hidden channels.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from evit_kernels.triton import _common as common

MAX_SPLITS = 16
"""The most slices a reduction is split into (a power of two: the slice axis of the summing kernel's tile)."""
BLOCK, SMALL_BLOCK, WARPS = 64, 16, 8
"""The outputs and warps of a program of the summing kernel: a (:data:`MAX_SPLITS` × 64) block of partial sums,
each of its 256 threads loading 4 adjacent outputs of one slice (16 bytes, where the output count is a multiple of
16: the divisibility the JIT proves alignment from), so that every partial sum is loaded at once rather than as a
link of a chain, in the widest loads. Otherwise, or where such programs would make less than half a wave (4 per SM;
8 fit), 16 outputs, one per thread: four times the programs (see :func:`block`)."""


TARGET_PER_SM = 4
"""The programs per SM a split launch aims at: the low end of what its builds fit. The groups-1 kernel's quarter
tiles run on 8 warps, and their split builds fit 3 to 6 an SM (38–80 registers, by the JIT's specialization, which
the launcher does not see); the regular tiles' 2 to 5; the FFN's about 4. The formula prices a split best where its
programs come just under one wave of the build: past it, a second wave of a few programs costs as much as the
first; under it, the time grows as the programs shrink, less steeply. The quarter tiles aimed at 6 until their
builds moved from 4 warps to 8: L3's 64-tile projections at 224 px then split 12 ways for a 4-per-SM build (10.9 µs,
against 8.5 at 8), and SAM-XL0's 256-tile ones at 1024 px 3 ways for a 5-per-SM build. Predicted at batch 1 (H100,
bf16), 6 → 4 for them: SAM-XL0 1.56× → 1.59× (fused modules slower than eager 5 → 1), SAM-L0 1.56× → 1.59×, L3
1.51× → 1.55× at 224 px and 1.44× → 1.42× at 384 px (160 tiles of a 6-per-SM build: 3 slices where 4 fill the
wave); B1, B3, L1, L2 and SAM-L0 at 4 unchanged. Sizing each split from its build's own CTAs per SM would win all of
these (benchmarks/NOTES.md). At 6 the FFN's splits were priced dearer too (M5 at batch 64)."""


def slices(programs: int, length: int, step: int, min_length: int, min_steps: int,
           max_programs: int | None = None, per_sm: int = TARGET_PER_SM) -> int:
    """Into how many slices a reduction of ``length`` walked in steps of ``step`` is split, for a launch of
    ``programs`` programs: where they are at most ``max_programs`` (by default as many as the GPU's SMs) and the
    reduction is at least ``min_length`` long, as many slices as bring the programs up to at most ``per_sm`` times
    the SMs, each of at least ``min_steps`` steps, at most :data:`MAX_SPLITS`, every slice the same
    whole number of steps (so the count returned is the count launched, none empty); otherwise 1. Shorter reductions
    or more programs gain less than the second launch and the partial sums' round trip cost (a 2-way split of 200
    programs over a 1024-long reduction is priced slower)."""
    if programs > (common.SMS if max_programs is None else max_programs) or length < min_length:
        return 1
    steps = common.cdiv(length, step)
    return whole_slices(steps, min(MAX_SPLITS, steps // min_steps, per_sm * common.SMS // programs))


def whole_slices(steps: int, wanted: int) -> int:
    """The count of slices, at most ``wanted`` (≥ 1), that ``steps`` steps make when each slice takes the same whole
    number of steps (the last one fewer): none is empty, so the count returned is the count launched."""
    return common.cdiv(steps, common.cdiv(steps, wanted))


def slice_length(length: int, step: int, splits: int) -> int:
    """The reduction length of each slice (the last one may be shorter), a whole number of steps."""
    return common.cdiv(common.cdiv(length, step), splits) * step


def partials(out: torch.Tensor, splits: int) -> torch.Tensor:
    """The fp32 partial sums of ``splits`` slices for output ``out`` (B, C, H, W): ``splits`` images of ``out``'s
    layout (NCHW or channels_last) ahead of one another, batch outermost. A slice is ``out.shape[0]`` times the
    batch stride of the result apart (see :func:`add`)."""
    batch, channels, height, width = out.shape
    channels_last = out.stride(1) == 1 and channels > 1
    return torch.empty((splits * batch, channels, height, width), dtype=torch.float32, device=out.device,
                       memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@triton.jit
def _split_sum_kernel(partials, bias, residual, out, n_outputs, channels, channel_step, splits, has_bias,
                      has_residual, ACTIVATION: tl.constexpr, MAX_SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    # The fp32 partial sums of the ``splits`` slices of ``BLOCK`` outputs, numbered in memory order (partials,
    # residual and output share one dense layout; a slice is ``n_outputs`` after the last), loaded as one
    # (slice × output) block and added by one reduction over the slices (a fixed tree: the same sum on every run),
    # then the epilogue. Output i has channel (i // channel_step) % channels.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_s = tl.arange(0, MAX_SPLITS)
    mask = offs < n_outputs
    at = partials + offs_s[:, None] * n_outputs + offs[None, :]
    y = tl.sum(tl.load(at, mask=(offs_s < splits)[:, None] & mask[None, :], other=0.0), axis=0, keep_dims=True)
    y = common.activate(common.add_bias(y, bias, (offs // channel_step) % channels, mask, has_bias),
                        ACTIVATION=ACTIVATION)
    if has_residual != 0:
        y += tl.load(residual + offs[None, :], mask=mask[None, :], other=0.0).to(tl.float32)
    tl.store(out + offs[None, :], y.to(out.dtype.element_ty), mask=mask[None, :])


def dense_layout(t: torch.Tensor) -> torch.memory_format | None:
    """The memory format in which ``t`` (B, C, H, W) is dense (NCHW first), or None."""
    for layout in (torch.contiguous_format, torch.channels_last):
        if t.is_contiguous(memory_format=layout):
            return layout
    return None


def block(n_outputs: int) -> int:
    """The outputs per program of the summing kernel for ``n_outputs`` outputs: :data:`BLOCK` where that makes at
    least half a wave of programs (4 per SM) and ``n_outputs`` is a multiple of 16 (else the loads are 4 bytes wide
    all the same), else :data:`SMALL_BLOCK`. Under half a wave the formula prices a launch by the share of the GPU's
    threads it keeps busy, which four times the programs more than repay over the narrower loads (M4's FFNs at
    batch 1: 16 pixels × 384 outputs, 96 programs of 64 outputs, 4.3 µs; 384 of 16, 3.5 µs); over it, the 16-byte
    loads win (L3 at batch 1, 224 px: 49 × 1024 outputs, 784 programs of 64, 4.3 µs; 3200 programs of 16 outputs
    with 4-byte loads, the kernel before, 5.1 µs)."""
    return BLOCK if n_outputs % 16 == 0 and common.cdiv(n_outputs, BLOCK) >= 4 * common.SMS else SMALL_BLOCK


def add(sums: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None, out: torch.Tensor,
        activation: str) -> torch.Tensor:
    """Writes ``act(Σ slices + bias) + residual`` into ``out`` (B, C, H, W) from the partial sums ``sums``
    (:func:`partials`: as many slices as it holds images of ``out``). The kernel walks the outputs in memory order:
    an ``out`` dense in neither layout is written through a dense copy, a ``residual`` laid out otherwise than
    ``out`` read through one."""
    batch = out.shape[0]
    layout = dense_layout(sums)
    if layout is None or sums.shape[0] % batch or sums.shape[1:] != out.shape[1:]:
        raise ValueError(f"split_sum.add: the partial sums {tuple(sums.shape)} (strides {sums.stride()}) are not "
                         f"whole dense images of the {tuple(out.shape)} output; make them with split_sum.partials")
    if dense_layout(out) != layout:
        staged = torch.empty_like(out, memory_format=layout)
        return out.copy_(add(sums, bias, residual, staged, activation))
    if residual is not None and residual.stride() != out.stride():
        residual = residual.contiguous(memory_format=layout)
    _, channels, height, width = out.shape
    n_outputs = out.numel()
    bias, has_bias, _ = common.optional(bias, out)
    residual, has_residual, _ = common.optional(residual, out)
    channel_step = 1 if layout == torch.channels_last else height * width
    outputs_per_program = block(n_outputs)
    _split_sum_kernel[(common.cdiv(n_outputs, outputs_per_program),)](
        sums, bias, residual, out, n_outputs, channels, channel_step, sums.shape[0] // batch, has_bias, has_residual,
        ACTIVATION=activation, MAX_SPLITS=MAX_SPLITS, BLOCK=outputs_per_program, num_warps=WARPS)
    return out


def compile_configs():
    """Every (kernel, signature, constexprs, options) :func:`add` can request: CI compiles each one ahead of time for
    sm_90, so an error only the GPU compiler would raise fails there instead of on a user's GPU."""
    from evit_kernels.ops.conv_bn_act import ACTIVATIONS

    pointers = ("bias", "residual", "out")
    for ptr in common.POINTER_TYPES.values():
        for activation, outputs_per_program in itertools.product(ACTIVATIONS, (BLOCK, SMALL_BLOCK)):
            constexprs = {"ACTIVATION": activation, "MAX_SPLITS": MAX_SPLITS, "BLOCK": outputs_per_program}
            yield (_split_sum_kernel, common.signature(_split_sum_kernel, ptr, constexprs, pointers,
                                                       special={"partials": "*fp32"}),
                   constexprs, {"num_warps": WARPS})
