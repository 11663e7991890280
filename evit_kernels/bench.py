"""The CLI's main job: a real model run eager, under torch.compile, patched, and patched under torch.compile, timed
and checked side by side."""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

import evit_kernels
from evit_kernels.info import info

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Largest relative error (max |y - y_eager| / max |y_eager|) still called agreement, per dtype.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 1e-1}


@dataclass
class Result:
    variant: str
    ms_per_batch: float
    images_per_s: float
    speedup: float = 1.0
    max_abs_err: float = 0.0
    rel_err: float = 0.0
    agrees: bool = True


@dataclass
class Report:
    model: str
    batch: int
    res: tuple[int, int]
    dtype: str
    device: str
    environment: dict
    commit: str | None
    results: list[Result] = field(default_factory=list)
    patch_report: str | None = None


class Progress:
    """One status line per phase on stderr, updated in place on a terminal, with elapsed seconds."""

    def __init__(self, total_phases: int):
        self.total, self.phase = total_phases, 0

    def start(self, label: str) -> Callable[[str], None]:
        self.phase += 1
        began = time.perf_counter()
        prefix = f"[{self.phase}/{self.total}] {label}"
        tty = sys.stderr.isatty()

        def update(detail: str = "") -> None:
            text = f"{prefix} {detail} ({time.perf_counter() - began:.1f} s)"
            print(("\r" + text) if tty else text, end="" if tty else "\n", file=sys.stderr, flush=True)

        update("...")
        return update

    def done(self, update: Callable[[str], None], detail: str) -> None:
        update(detail)
        if sys.stderr.isatty():
            print(file=sys.stderr)


def build_model(name: str, device: str | torch.device = "cpu") -> nn.Module:
    """A timm EfficientViT (``efficientvit_*``), an efficientsam image encoder (``efficientvit-sam-*``) or one of
    :data:`evit_kernels.diffusers_models.MODELS`, built offline with random weights, in eval mode, with
    :func:`randomize_untrained_state` applied. A diffusers model is built on ``device`` (on "meta" a billion
    parameters cost nothing); the others on the CPU, where patching reads their weights."""
    from evit_kernels import diffusers_models

    if name in diffusers_models.MODELS:
        return diffusers_models.build(name, device)
    if name.startswith("efficientvit-sam-"):
        from efficientsam.sam_model_zoo import create_efficientvit_sam_model

        model = create_efficientvit_sam_model(name, pretrained=False).image_encoder
    else:
        import timm

        model = timm.create_model(name, pretrained=False)
    randomize_untrained_state(model)
    return model.eval()


def default_res(name: str) -> tuple[int, int]:
    """The input size model ``name`` is released for: 512 px for the SAM encoders, a diffusers model's own
    (:func:`evit_kernels.diffusers_models.default_res`), 224 px otherwise."""
    from evit_kernels import diffusers_models

    if name.startswith("efficientvit-sam"):
        return (512, 512)
    return diffusers_models.default_res(name) if name in diffusers_models.MODELS else (224, 224)


def input_shape(name: str, batch: int, res: tuple[int, int]) -> tuple[int, ...]:
    """The input of model ``name`` for ``batch`` images of ``res`` pixels: the images, or for a diffusers model
    their latents (:func:`evit_kernels.diffusers_models.latent_shape`)."""
    from evit_kernels import diffusers_models

    if name in diffusers_models.MODELS:
        return diffusers_models.latent_shape(name, batch, res)
    return batch, 3, *res


def needs_autocast(name: str) -> bool:
    """Whether model ``name`` runs in reduced precision only under autocast: mit-han-lab's code (the efficientsam
    encoders) casts to fp32 inside autocast-disabled regions and relies on autocast to cast back."""
    return name.startswith("efficientvit-sam-")


@torch.no_grad()
def randomize_untrained_state(model: nn.Module, seed: int = 0) -> None:
    """Give the state a fresh model leaves trivial a random value: BatchNorm statistics and affine parameters
    (identity BN would hide folding mistakes) and attention bias tables (zero-initialised)."""
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(getattr(m, "attention_biases", None), torch.Tensor):
            m.attention_biases.copy_(torch.randn(m.attention_biases.shape, generator=generator))
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
            if m.affine:
                m.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(c, generator=generator) * 0.1)


def _time_once(fn: Callable[[], torch.Tensor], device: torch.device) -> float:
    """Milliseconds of one call: CUDA events on a GPU, wall clock on CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    began = time.perf_counter()
    fn()
    return (time.perf_counter() - began) * 1e3


def in_cuda_graph(fn: Callable[[], torch.Tensor], warmup: int = 3) -> Callable[[], torch.Tensor]:
    """``fn`` captured in a CUDA graph at the first call (after ``warmup`` calls on a side stream, which compile the
    kernels and allocate what ``fn`` needs), and replayed at every call: no host work per call but the replay's.
    ``fn``'s inputs must stay where they are; the result is the graph's output tensor, which each replay
    overwrites."""
    graph, out = None, None

    def replay() -> torch.Tensor:
        nonlocal graph, out
        if graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = fn()
        graph.replay()
        return out

    return replay


def time_interleaved(fns: dict[str, Callable[[], torch.Tensor]], device: torch.device, warmup: int, iters: int,
                     tick: Callable[[str], None]) -> dict[str, float]:
    """Median milliseconds per call of each function, timed round-robin (one call of each per round) so that a
    change in machine load or clocks affects every variant alike."""
    for i in range(warmup):
        for fn in fns.values():
            fn()
        tick(f"warm-up {i + 1}/{warmup}")
    times = {name: [] for name in fns}
    for i in range(iters):
        for name, fn in fns.items():
            times[name].append(_time_once(fn, device))
        tick(f"round {i + 1}/{iters}")
    return {name: statistics.median(t) for name, t in times.items()}


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def run(model_name: str, batch: int, res: tuple[int, int], dtype: str, device: str, compile_mode: str | None,
        warmup: int, iters: int) -> Report:
    dev = torch.device(device)
    torch_dtype = DTYPES[dtype]
    variants = ["eager"] + (["torch.compile"] if compile_mode else []) + ["patched"]
    variants += ["patched+compile"] if compile_mode else []
    progress = Progress(len(variants) + 2)

    tick = progress.start(f"building {model_name}")
    model = build_model(model_name, dev).to(dev, torch_dtype)
    x = torch.randn(input_shape(model_name, batch, res), device=dev, dtype=torch_dtype)
    progress.done(tick, "done")

    report = Report(model_name, batch, res, dtype, device, info(), git_commit())
    patched = copy.deepcopy(model)
    report.patch_report = str(evit_kernels.patch(patched))
    # The patched model under torch.compile: its kernels are graph nodes, the rest is the compiler's.
    builds = {"eager": lambda: model, "torch.compile": lambda: torch.compile(model, mode=compile_mode),
              "patched": lambda: patched, "patched+compile": lambda: torch.compile(patched, mode=compile_mode)}
    calls, outputs = {}, {}
    low_precision = needs_autocast(model_name) and torch_dtype != torch.float32
    precision = torch.autocast(dev.type, torch_dtype) if low_precision else contextlib.nullcontext()
    for variant in variants:
        tick = progress.start(f"preparing {variant}")
        fn_model = builds[variant]()
        with torch.inference_mode(), precision:
            outputs[variant] = _first_tensor(fn_model(x)).float()  # the first call also compiles
        calls[variant] = functools.partial(fn_model, x)
        progress.done(tick, "done")

    tick = progress.start("timing, one call of each variant per round")
    with torch.inference_mode(), precision:
        ms = time_interleaved(calls, dev, warmup, iters, tick)
    progress.done(tick, ", ".join(f"{v} {t:.2f} ms" for v, t in ms.items()))

    reference = outputs["eager"]
    for variant in variants:
        out = outputs[variant]
        result = Result(variant, ms[variant], batch / ms[variant] * 1e3, speedup=ms["eager"] / ms[variant])
        result.max_abs_err = (out - reference).abs().max().item()
        result.rel_err = result.max_abs_err / max(reference.abs().max().item(), 1e-30)
        result.agrees = bool(torch.isfinite(out).all()) and result.rel_err <= TOLERANCE[torch_dtype]
        report.results.append(result)
    return report


def _first_tensor(out) -> torch.Tensor:
    """Models return a tensor, a list of feature maps or a dict; compare on the first tensor."""
    while not isinstance(out, torch.Tensor):
        out = next(iter(out.values())) if isinstance(out, dict) else out[0]
    return out


def format_report(report: Report) -> str:
    env = report.environment
    where = env["gpu"]["name"] if report.device.startswith("cuda") and env["gpu"] else "CPU"
    lines = [
        f"{report.model}  batch {report.batch}  {report.res[0]}x{report.res[1]}  {report.dtype}  on {where}  "
        f"(torch {env['torch']}, evit_kernels {env['evit_kernels']}{', ' + report.commit if report.commit else ''})",
        "",
        f"{'variant':<17}{'ms/batch':>10}{'images/s':>12}{'speedup':>9}{'max abs err':>13}{'rel err':>10}  agrees",
    ]
    for r in report.results:
        lines.append(f"{r.variant:<17}{r.ms_per_batch:>10.2f}{r.images_per_s:>12.1f}{r.speedup:>8.2f}x"
                     f"{r.max_abs_err:>13.2e}{r.rel_err:>10.2e}  {'yes' if r.agrees else 'NO'}")
    if report.patch_report:
        lines += ["", report.patch_report]
    return "\n".join(lines)


def save_json(report: Report, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(asdict(report), indent=2))
