"""Host time of a patched model's forward on the kernels, without a GPU: what the dispatch, the argument checks and
the launchers' own Python cost per op call, the part of batch-1 latency a CUDA graph removes.

    python -m benchmarks.host_time --model efficientvit_b1 [--res 224 224] [--repeats 60]

The model runs on CPU tensors through the Triton backends (``TRITON_INTERPRET=1``) with every kernel launch
replaced by a no-op, so the time is the host's alone: the best of ``--repeats`` forwards of the model's features
(timm's ``forward_features``, else the whole model), batch 1, bf16, inference mode. ATen ops the kernels do not
replace still compute on the CPU: compare commits on one machine, on models whose features are all patched (B1, L2;
M4's attention still runs PyTorch convs). Triton's own launcher, which a GPU adds per launch, is not counted.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the launches go through the interpreter's class

import torch  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import evit_kernels  # noqa: E402
from evit_kernels import bench, dispatch  # noqa: E402


def host_time(name: str, res: tuple[int, int], repeats: int) -> dict:
    """Best forward time (ms), op calls and kernel launches of ``name`` patched on the kernels, launches stubbed."""
    model = bench.build_model(name).to(torch.bfloat16)
    evit_kernels.patch(model, backend="experimental")
    forward = getattr(model, "forward_features", model)
    x = torch.randn(bench.input_shape(name, 1, res), dtype=torch.bfloat16)
    launches, calls = [], []
    original_run = InterpretedFunction.run
    InterpretedFunction.run = lambda kernel, *args, grid, warmup, **kwargs: launches.append(kernel)
    try:
        with torch.inference_mode():
            with dispatch.observing(lambda _backend, args: calls.append(args.op)):
                forward(x)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                forward(x)
                times.append(time.perf_counter() - start)
    finally:
        InterpretedFunction.run = original_run
    if not calls:
        raise SystemExit(f"{name}: no evit op ran (patch swapped nothing): there is no dispatch to time")
    n_launches = len(launches) // (repeats + 1)
    best = min(times) * 1e3
    return {"model": name, "ms": best, "op_calls": len(calls), "launches": n_launches,
            "us_per_op_call": best * 1e3 / len(calls)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="efficientvit_b1")
    parser.add_argument("--res", type=int, nargs=2, default=None, metavar=("H", "W"))
    parser.add_argument("--repeats", type=int, default=60)
    args = parser.parse_args()
    res = tuple(args.res) if args.res else bench.default_res(args.model)
    r = host_time(args.model, res, args.repeats)
    print(f"{r['model']} batch 1 {res[0]}x{res[1]} bf16, launches stubbed (host time, not GPU time): "
          f"{r['ms']:.2f} ms per forward, {r['op_calls']} op calls, {r['launches']} launches, "
          f"{r['us_per_op_call']:.0f} us per op call")


if __name__ == "__main__":
    main()
