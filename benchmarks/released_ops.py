"""Every distinct op call of the released models (``evit_kernels.predict.RELEASED``), run on every backend that takes
it: checked against the reference and timed, next to the performance model's prediction for the same call.

The op calls are those the patched model makes (recorded on meta tensors, as ``predict`` records them), made real
with random values; calls of one shape class (``OpArgs.shape_class``) are measured once. The kernel side of the
prediction is read from ``benchmarks/predictions/<model>_<batch>_<res>.json`` (``make predictions``: it needs the
interpreter and ptxas, too slow for the GPU window), the reference side is priced here. The JSON this writes is
what ``benchmarks/record_measured.py`` turns into the automatic choice's table.

On a GPU each backend's call is also profiled once (``torch.profiler``): the GPU kernels it launched, each with its
time, and their sum, ``kernel_ms``. The timed ``ms`` minus ``kernel_ms`` is about the host's share where the
kernels are short (the first pass found 0.1–0.3 ms per call on the Triton path), and the per-kernel times are what
the prediction's per-launch prices are checked against.

Without a GPU (the GPU pass's dry run) it runs one tiny configuration through the Triton interpreter, to check
the script, not the CPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import ON_GPU, bench_ms
from evit_kernels import dispatch, predict
from evit_kernels.bench import DTYPES, TOLERANCE, git_commit
from evit_kernels.triton._common import without_on_chip_gathers

PREDICTIONS = Path(__file__).with_name("predictions")
DRY_RUN = (("efficientvit_b0", 1, 64),)


def predicted_kernel_ms(name: str, batch: int, res: int) -> dict[int, dict[str, float]]:
    """Per op call index: the predicted milliseconds of its launches by kernel, from the committed prediction."""
    path = PREDICTIONS / f"{name}_{batch}_{res}.json"
    if not path.exists():
        return {}
    calls: dict[int, dict[str, float]] = {}
    for launch in json.loads(path.read_text())["launches"]:
        kernels = calls.setdefault(launch["op_call"], {})
        kernels[launch["kernel"]] = kernels.get(launch["kernel"], 0.0) + launch["seconds"] * 1e3
    return calls


def predicted_reference_ms(args, gpu: predict.Gpu) -> float:
    reference = dispatch.get(args.op, "torch")
    return sum(c.seconds for c in predict.eager_costs(lambda _: reference.forward(args), None, gpu)) * 1e3


def profiled_kernels(fn) -> list[tuple[str, float]]:
    """(name, milliseconds) of each GPU kernel one call of ``fn`` launches, in launch order (none on CPU, where the
    profiler still runs, so that the dry run goes through this code)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ON_GPU else [])
    with profile(activities=activities) as prof:
        fn()
        if ON_GPU:
            torch.cuda.synchronize()
    return [(e.name[:100], e.time_range.elapsed_us() / 1e3) for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA]


def timed(call, expected: torch.Tensor, dtype: torch.dtype) -> dict:
    """``call``'s milliseconds and error against ``expected``, and on a GPU one call's kernels with their times."""
    out = call().float()
    rel_err = ((out - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
    result = {"ms": bench_ms(call), "rel_err": rel_err,
              "ok": bool(torch.isfinite(out).all()) and rel_err <= TOLERANCE[dtype]}
    kernels = profiled_kernels(call)
    if ON_GPU:
        result.update(kernel_ms=sum(ms for _, ms in kernels), kernels=kernels)
    return result


def alternative_calls(args, real) -> dict[str, functools.partial]:
    """The paths the Triton backend chooses between by shape that are timed too, so that a GPU settles the choice
    (``args``: the call on meta tensors, ``real`` made real):

    - conv_block's layer-by-layer path where the backend takes the spatial-conv-and-projection kernel. The formula
      prefers the kernel there, but it missed the DSConv kernel's measured time by 4.9x and the layer-by-layer path's
      by 1.4x (benchmarks/NOTES.md).
    - the tile kernels where the backend gathers on chip (``_common.without_on_chip_gathers``: the depthwise plane
      kernel, the linear attention's whole heads, the row-staged 3×3 conv on wide maps): the formula prices their
      wide loads but not the gathers' shared-memory traffic. Offered where the launches made without the gathers
      differ (recorded on ``args``)."""
    from evit_kernels.ops.conv_block import _per_layer, _whole_block_config

    if "triton" not in dispatch._REGISTRY[args.op]:
        return {}
    triton = dispatch.get(args.op, "triton")
    if triton.not_supported_reasons(real):
        return {}
    alternatives = {}
    if real.op == "conv_block" and _whole_block_config(real)[0] is not None:
        alternatives["triton layer by layer"] = functools.partial(_per_layer, real)
    with without_on_chip_gathers():
        without = planned_launches(triton, args)
    if without != planned_launches(triton, args):
        alternatives["triton without on-chip gathers"] = functools.partial(call_without_gathers, triton, real)
    return alternatives


def planned_launches(backend: dispatch.Backend, args) -> list[tuple[str, dict]]:
    """(kernel, constexprs) of every launch ``backend`` makes for ``args`` (meta tensors), recorded, not run."""
    with predict.recorded_launches() as launches:
        dispatch.call(backend, args)
    return [(launch.kernel, launch.constexprs) for launch in launches]


def call_without_gathers(backend: dispatch.Backend, args):
    with without_on_chip_gathers():
        return dispatch.call(backend, args)


def measure_call(args, device: str) -> dict[str, dict]:
    """``measured``: every backend of ``args.op`` on ``args`` made real, :func:`timed`, or the reasons it cannot
    run; ``alternatives``: :func:`alternative_calls`, timed alike."""
    real = type(args)(*predict.materialized(list(args.fields()), device, lambda t: t.uniform_(-1, 1)))
    dtype = real.tensors()[0].dtype
    with torch.no_grad():
        expected = dispatch.call(dispatch.get(args.op, "torch"), real).float()
        measured = {}
        for name in dispatch.PREFERENCE:
            if name not in dispatch._REGISTRY[args.op]:
                continue
            backend = dispatch.get(args.op, name)
            reasons = backend.not_supported_reasons(real)
            measured[name] = ({"reasons": reasons} if reasons
                              else timed(functools.partial(dispatch.call, backend, real), expected, dtype))
        alternatives = {name: timed(call, expected, dtype) for name, call in alternative_calls(args, real).items()}
    return {"measured": measured, "alternatives": alternatives}


def measure_model(name: str, batch: int, res: int, gpu: predict.Gpu, device: str) -> list[dict]:
    run = predict.patched_run(name, batch, (res, res), DTYPES["bf16" if ON_GPU else "fp32"], gpu)
    kernels = predicted_kernel_ms(name, batch, res)
    launched = {}
    for launch in run.launches:
        launched.setdefault(launch.op_call, []).append(launch.kernel)
    rows: dict[str, dict] = {}
    for index, args in enumerate(run.op_calls):
        key = f"{args.op} {args.shape_class()}"
        if key in rows:
            rows[key]["calls"] += 1
            continue
        predicted = kernels.get(index, {})
        rows[key] = {
            "model": name, "batch": batch, "res": res, "op": args.op, "shape_class": args.shape_class(), "calls": 1,
            "kernels": launched.get(index, []),
            # the committed prediction's launches of this call, if they are the launches made here
            "predicted_ms": {"torch": predicted_reference_ms(args, gpu),
                             **({"triton": sum(predicted.values())}
                                if sorted(predicted) == sorted(set(launched.get(index, []))) and predicted else {})},
            **measure_call(args, device),
        }
    return list(rows.values())


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'model':<20}{'batch':>6} {'op':<34}{'calls':>6}  backend   predicted ms  measured ms  kernel ms"
             "  rel err  ok"]
    for row in rows:
        for name, m in [*row["measured"].items(), *row["alternatives"].items()]:
            if "ms" not in m:
                continue
            predicted = row["predicted_ms"].get(name)
            lines.append(f"{row['model']:<20}{row['batch']:>6} {row['op']:<34}{row['calls']:>6}  {name:<8}"
                         f"{predicted if predicted is not None else float('nan'):>13.4f}{m['ms']:>13.4f}"
                         f"{m.get('kernel_ms', float('nan')):>11.4f}{m['rel_err']:>9.1e}  {'yes' if m['ok'] else 'NO'}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    gpu_name = torch.cuda.get_device_name() if ON_GPU else "none (CPU)"
    gpu = predict.GPUS["h200" if "H200" in gpu_name else "h100"]
    device = "cuda" if ON_GPU else "cpu"
    rows, skipped = [], []
    for name, batch, res in predict.RELEASED if ON_GPU else DRY_RUN:
        try:
            rows += measure_model(name, batch, res, gpu, device)
        except ImportError as exc:  # efficientsam may be missing on the GPU machine
            skipped.append(f"{name}: {exc}")
        Path(args.json).write_text(json.dumps({"gpu": gpu_name, "commit": git_commit(), "predicted_for": gpu.name,
                                               "skipped": skipped, "rows": rows}, indent=1))
    print(format_rows(rows))
    for line in skipped:
        print("skipped", line)
    bad = [r for r in rows for m in [*r["measured"].values(), *r["alternatives"].values()] if m.get("ok") is False]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
