"""`python -m evit_kernels predict`: a model's predicted GPU time, eager and patched, on a machine without a GPU.

Eager's side is every aten op of the unpatched model (:func:`evit_kernels.predict.eager_run`). The patched side is
every Triton launch of the patched model plus the aten ops it still runs around them
(:func:`evit_kernels.predict.patched_run`). Each launch is priced from three sets of facts: its sm_90 build
(:func:`evit_kernels.predict.compile_facts`), what its programs request and execute
(:mod:`evit_kernels.program_counts`, in an interpreter subprocess) and the bytes of the tensors it touches. Both
sides go through the one formula of :func:`evit_kernels.predict.seconds`. Every number is a prediction.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from evit_kernels import dispatch, predict
from evit_kernels.program_counts import Counts


@dataclass(frozen=True)
class PricedLaunch:
    """One Triton launch of the patched model with every fact its price comes from, and the price."""

    op: str
    op_call: int
    module: str
    kernel: str
    grid: tuple[int, ...]
    ctas: int
    constexprs: dict[str, str]
    facts: predict.CompileFacts
    counts: Counts
    footprint_bytes: int
    hbm_bytes: float
    """What HBM must deliver: the bytes requested, but no more than the tensors' footprint (a re-read is taken to
    hit L2)."""
    memory_efficiency: float
    wave_factor: float
    seconds: float


def price(launch: predict.Launch, facts: predict.CompileFacts, counts: Counts, gpu: predict.Gpu) -> PricedLaunch:
    """``launch`` priced by the formula: HBM bytes at the bandwidth share of its access widths (loads at its widest
    load's e_mem, stores at its widest store's, weighted by the bytes each requests), products at its matrix
    instruction's peak, elementwise FLOPs at fp32 FMA's, stretched by its tail wave."""
    loaded, stored = counts.loaded_bytes, counts.stored_bytes
    requested = loaded + stored
    hbm = min(requested, launch.footprint_bytes)
    efficiency = requested / (loaded / predict.memory_efficiency(facts.widest_load)
                              + stored / predict.memory_efficiency(facts.widest_store)) if requested else 1.0
    waves = predict.wave_factor(launch.ctas, facts.ctas_per_sm, gpu)
    flops = {facts.instruction: counts.dot_flops}
    flops["fma"] = flops.get("fma", 0.0) + counts.elementwise_flops
    return PricedLaunch(
        launch.op, launch.op_call, launch.module, launch.kernel,
        launch.grid, launch.ctas, {k: str(v) for k, v in launch.constexprs.items()}, facts, counts,
        launch.footprint_bytes, hbm, efficiency, waves, predict.seconds(gpu, hbm, flops, efficiency, waves))


def useful_flops(args: object) -> int:
    """The FLOPs of the op's reference on its argument record (the products PyTorch counts: convolutions and
    matmuls), on meta tensors."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        dispatch.get(args.op, "torch").forward(args)
    return counter.get_total_flops()


def program_counts(name: str, batch: int, res: tuple[int, int], dtype: str, layout: str) -> list[dict]:
    """:mod:`evit_kernels.program_counts` of the patched model, run in a subprocess under the interpreter."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "evit_kernels.program_counts", name, str(batch), *map(str, res),
                          dtype, layout], capture_output=True, text=True, env=env)
    if run.returncode:
        raise RuntimeError(f"counting the launches of {name} failed:\n{run.stderr[-3000:]}")
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


@dataclass
class Prediction:
    model: str
    batch: int
    res: tuple[int, int]
    dtype: str
    layout: str
    gpu: str
    commit: str | None
    eager_ms: float
    patched_ms: float
    eager_launches: int
    patched_aten_launches: int
    patched_aten_ms: float
    """The aten ops the patched model still runs (layers left unpatched, copies around the kernels)."""
    launches: list[PricedLaunch] = field(default_factory=list)
    modules: dict[str, dict] = field(default_factory=dict)
    """Per fused-module class (and "" for everything not patched): instances, eager and patched milliseconds."""
    instances: dict[str, dict] = field(default_factory=dict)
    """Per fused module by name: its class, and the eager milliseconds of the unpatched model's ops in it against the
    patched milliseconds of its launches and of the aten ops it still runs inside it."""
    op_calls: dict[int, dict] = field(default_factory=dict)
    """Per op call that launched a kernel (``PricedLaunch.op_call``): its op, shape class and useful FLOPs."""


def predict_model(name: str, batch: int, res: tuple[int, int], dtype: str, gpu_name: str, ptxas: str,
                  layout: str = "nchw") -> Prediction:
    from evit_kernels.bench import DTYPES, git_commit

    gpu = predict.GPUS[gpu_name]
    torch_dtype = DTYPES[dtype]
    memory_format = predict.LAYOUTS[layout]
    run = predict.patched_run(name, batch, res, torch_dtype, gpu, memory_format)
    glue, launches, fused = run.aten, run.launches, run.fused
    eager = predict.eager_run(name, batch, res, torch_dtype, gpu, list(fused), memory_format)
    counted = program_counts(name, batch, res, dtype, layout)
    if [(c["kernel"], tuple(c["grid"])) for c in counted] != [(launch.kernel, launch.grid) for launch in launches]:
        raise RuntimeError(f"{name}: the interpreter run launched other kernels than the compiled one")
    facts: dict[tuple, predict.CompileFacts] = {}
    priced = []
    for launch, c in zip(launches, counted, strict=True):
        key = predict.specialization_key(launch)
        if key not in facts:
            facts[key] = predict.compile_facts(launch, ptxas)
        counts = Counts(*(c[f] for f in Counts.__dataclass_fields__))
        priced.append(price(launch, facts[key], counts, gpu))
    op_calls = {}
    for index in dict.fromkeys(launch.op_call for launch in launches):
        args = run.op_calls[index]
        op_calls[index] = {"op": args.op, "shape_class": args.shape_class(), "useful_flops": useful_flops(args)}

    instances = {module: {"class": cls, "eager_ms": 0.0, "patched_ms": 0.0} for module, cls in fused.items()}
    modules: dict[str, dict] = defaultdict(lambda: {"eager_ms": 0.0, "patched_ms": 0.0})
    for side, items in (("eager_ms", eager), ("patched_ms", [*glue, *priced])):
        for item in items:
            modules[fused.get(item.module, "")][side] += item.seconds * 1e3
            if item.module in instances:
                instances[item.module][side] += item.seconds * 1e3
    counts = Counter(fused.values())
    return Prediction(
        name, batch, res, dtype, layout, gpu.name, git_commit(), sum(c.seconds for c in eager) * 1e3,
        sum(item.seconds for item in [*glue, *priced]) * 1e3, len(eager), len(glue),
        sum(c.seconds for c in glue) * 1e3, priced,
        {cls: {"instances": counts[cls], **m} for cls, m in modules.items()}, instances, op_calls)


def format_prediction(p: Prediction) -> str:
    lines = [
        f"{p.model}  batch {p.batch}  {p.res[0]}x{p.res[1]}  {p.dtype}  {p.layout}  predicted for {p.gpu}"
        f"{'  (' + p.commit + ')' if p.commit else ''}",
        "PREDICTION by the fixed formula of docs/performance.md, not a GPU measurement.",
        "",
        f"eager {p.eager_ms:.2f} ms ({p.eager_launches} kernels)   patched {p.patched_ms:.2f} ms "
        f"({len(p.launches)} Triton launches + {p.patched_aten_launches} aten kernels)   "
        f"patched vs eager {p.eager_ms / p.patched_ms:.2f}x",
        "",
        f"{'module class':<28}{'count':>6}{'eager ms':>10}{'patched ms':>12}{'speedup':>9}",
    ]
    for cls, m in sorted(p.modules.items(), key=lambda item: -item[1]["eager_ms"]):
        lines.append(f"{cls or '(not patched)':<28}{m['instances'] or '':>6}{m['eager_ms']:>10.3f}"
                     f"{m['patched_ms']:>12.3f}{m['eager_ms'] / m['patched_ms']:>8.2f}x")
    slower = slower_instances(p)
    lines += ["", f"fused modules predicted slower than the eager ops they replace: {len(slower)} of "
                  f"{len(p.instances)}"]
    if slower:
        lines.append(f"  {'module':<40}{'class':<24}{'eager ms':>10}{'patched ms':>12}{'speedup':>9}")
    lines += [f"  {module:<40}{m['class']:<24}{m['eager_ms']:>10.4f}{m['patched_ms']:>12.4f}"
              f"{m['eager_ms'] / m['patched_ms']:>8.2f}x" for module, m in slower]
    lines += ["", f"{'op / kernel':<34}{'launches':>9}{'regs':>5}{'spill':>6}{'CTA/SM':>7}{'instr':>9}{'ld/st B':>8}"
                  f"{'useful GF':>10}{'exec GF':>9}{'HBM GB':>8}{'req GB':>8}{'ms':>8}"]
    useful: dict[str, int] = defaultdict(int)
    for call in p.op_calls.values():
        useful[call["op"]] += call["useful_flops"]
    by_op: dict[str, dict[str, list[PricedLaunch]]] = defaultdict(lambda: defaultdict(list))
    for launch in p.launches:
        by_op[launch.op][launch.kernel].append(launch)
    for op, kernels in by_op.items():
        launches = [x for group in kernels.values() for x in group]
        lines.append(f"{op:<34}{len(launches):>9}{'':>43}{useful[op] / 1e9:>10.1f}{'':>25}"
                     f"{sum(x.seconds for x in launches) * 1e3:>8.3f}")
        for kernel, group in kernels.items():
            f = group[0].facts
            executed = sum(x.counts.dot_flops + x.counts.elementwise_flops for x in group)
            requested = sum(x.counts.loaded_bytes + x.counts.stored_bytes for x in group)
            lines.append(
                f"  {kernel:<32}{len(group):>9}{max(x.facts.registers for x in group):>5}"
                f"{max(x.facts.spill_bytes for x in group):>6}{min(x.facts.ctas_per_sm for x in group):>7}"
                f"{f.instruction:>9}{f'{f.widest_load}/{f.widest_store}':>8}{'':>10}{executed / 1e9:>9.1f}"
                f"{sum(x.hbm_bytes for x in group) / 1e9:>8.3f}{requested / 1e9:>8.3f}"
                f"{sum(x.seconds for x in group) * 1e3:>8.3f}")
    return "\n".join(lines)


def slower_instances(p: Prediction) -> list[tuple[str, dict]]:
    """The fused modules whose patched time (launches and the aten ops inside them) exceeds the eager time of the
    ops they replace, slowest relative to eager first."""
    slower = [(module, m) for module, m in p.instances.items() if m["patched_ms"] > m["eager_ms"]]
    return sorted(slower, key=lambda item: item[1]["eager_ms"] / item[1]["patched_ms"])


def save_json(p: Prediction, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(asdict(p), indent=1))
