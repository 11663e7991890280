"""What a Triton launch asks of the GPU, counted rather than derived: bytes its loads and stores request and FLOPs
it executes, found by running a sample of its programs in the Triton interpreter on CPU tensors of the launch's
full size. The kernel's own code is what gets counted, so a kernel that recomputes or re-reads is counted with it,
and no per-kernel formula can drift from the kernel.

- Bytes: each load and store counts the lanes its mask lets through times the element size (a masked-off lane
  fetches nothing).
- FLOPs: each ``tl.dot`` counts 2·M·N·K for its whole tiles (padding lanes execute too); each floating-point
  arithmetic instruction (add, sub, mul, div, max, min, exp, log, sqrt, ...) counts one per element of its result
  tile, an FMA two. Reductions, comparisons, selects, casts and integer index arithmetic are not counted.
- Sampling: ``SAMPLES`` programs evenly spread over the grid, the first and last included, run with their true
  program ids and grid size; the launch's counts are their mean times the number of programs.

Run as ``python -m evit_kernels.program_counts MODEL BATCH H W DTYPE LAYOUT`` (with ``TRITON_INTERPRET=1``): prints
one JSON object per launch the patched model makes (:func:`evit_kernels.predict.patched_run`), in launch order.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch

from evit_kernels import predict
from evit_kernels.bench import DTYPES

SAMPLES = 8
_ELEMENTWISE = {"create_fadd": 1, "create_fsub": 1, "create_fmul": 1, "create_fdiv": 1, "create_precise_divf": 1,
                "create_frem": 1, "create_fma": 2, "create_minimumf": 1, "create_maximumf": 1, "create_minnumf": 1,
                "create_maxnumf": 1, "create_clampf": 2, "create_exp": 1, "create_exp2": 1, "create_log": 1,
                "create_log2": 1, "create_sqrt": 1, "create_precise_sqrt": 1, "create_rsqrt": 1, "create_erf": 1,
                "create_sin": 1, "create_cos": 1}
"""The interpreter's floating-point arithmetic instructions and the FLOPs each counts per result element."""


@dataclass(frozen=True)
class Counts:
    """One launch's loads and stores (bytes requested), products (``tl.dot`` FLOPs) and elementwise FLOPs, and how
    many of its programs were run to count them."""

    loaded_bytes: float
    stored_bytes: float
    dot_flops: float
    elementwise_flops: float
    sampled_programs: int


def sample(grid: tuple[int, ...], n: int = SAMPLES) -> list[tuple[int, int, int]]:
    """Up to ``n`` program ids evenly spread over ``grid`` (first and last included), as (x, y, z)."""
    gx, gy, gz = (*grid, 1, 1)[:3]
    total = gx * gy * gz
    m = min(n, total)
    flat = sorted({round(i * (total - 1) / max(m - 1, 1)) for i in range(m)})
    return [(f % gx, f // gx % gy, f // (gx * gy)) for f in flat]


@contextlib.contextmanager
def _counting(grid: tuple[int, ...], programs: list[tuple[int, int, int]]) -> Iterator[dict[str, float]]:
    """Inside the block, the interpreter runs program ``programs[i]`` of ``grid`` when asked for program (i, 0, 0),
    and adds what each instruction does to the dict yielded."""
    import numpy as np
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle
    from triton.runtime.interpreter import interpreter_builder as builder

    totals = {"loaded_bytes": 0.0, "stored_bytes": 0.0, "dot_flops": 0.0, "elementwise_flops": 0.0}
    true_grid = (*grid, 1, 1)[:3]
    originals = {}

    def override(name, method):
        originals[name] = getattr(builder, name)
        setattr(builder, name, method)

    def masked_load(ptrs, mask, *rest):
        totals["loaded_bytes"] += mask.data.sum() * ptrs.get_element_ty().primitive_bitwidth // 8
        return originals["create_masked_load"](ptrs, mask, *rest)

    def masked_store(ptrs, value, mask, *rest):
        totals["stored_bytes"] += mask.data.sum() * ptrs.get_element_ty().primitive_bitwidth // 8
        return originals["create_masked_store"](ptrs, value, mask, *rest)

    def dot(a, b, *rest):
        totals["dot_flops"] += 2 * a.data.size * b.data.shape[-1]
        return originals["create_dot"](a, b, *rest)

    def elementwise(name, flops):
        def counted(*args):
            result = originals[name](*args)
            totals["elementwise_flops"] += flops * result.data.size
            return result
        return counted

    def program_scalar(value):
        return TensorHandle(np.array([value], dtype=np.int32), tl.int32)

    override("create_get_program_id", lambda axis: program_scalar(programs[builder.grid_idx[0]][axis]))
    override("create_get_num_programs", lambda axis: program_scalar(true_grid[axis]))
    override("create_masked_load", masked_load)
    override("create_masked_store", masked_store)
    override("create_dot", dot)
    for name, flops in _ELEMENTWISE.items():
        override(name, elementwise(name, flops))
    try:
        yield totals
    finally:
        for name in originals:
            delattr(builder, name)


def count(launch: predict.Launch) -> Counts:
    """:class:`Counts` of ``launch`` (recorded under the interpreter: ``TRITON_INTERPRET=1``)."""
    from triton.runtime.interpreter import InterpretedFunction

    kernel = launch.kernel_fn
    if not isinstance(kernel, InterpretedFunction):
        raise TypeError(f"{launch.kernel}: counting runs the interpreter (set TRITON_INTERPRET=1)")
    programs = sample(launch.grid)
    args, kwargs = predict.materialized(launch.arguments, "cpu")
    with _counting(launch.grid, programs) as totals:
        kernel.run(*args, grid=(len(programs),), warmup=False, **kwargs)
    scale = launch.ctas / len(programs)
    return Counts(*(float(v) * scale for v in totals.values()), len(programs))


def _key(launch: predict.Launch) -> str:
    """Launches equal in kernel, grid, constants and tensor shapes count the same."""
    args, kwargs = launch.arguments
    described = [(tuple(v.shape), v.stride(), str(v.dtype)) if isinstance(v, torch.Tensor) else repr(v)
                 for v in [*args, *kwargs.values()]]
    return repr((launch.kernel, launch.grid, described))


def main(argv: list[str]) -> None:
    name, batch, height, width, dtype, layout = argv
    known: dict[str, Counts] = {}
    run = predict.patched_run(name, int(batch), (int(height), int(width)), DTYPES[dtype],
                              memory_format=predict.LAYOUTS[layout])
    for launch in run.launches:
        key = _key(launch)
        if key not in known:
            known[key] = count(launch)
        print(json.dumps({"kernel": launch.kernel, "grid": launch.grid, **asdict(known[key])}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
