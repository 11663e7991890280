"""The fixed performance model of docs/performance.md ("Predicting without a GPU"): the eager side of it (every aten
op a model runs eagerly, counted on meta tensors: no memory, no GPU) priced by the one formula

    t = max(bytes / (BW · e_mem), flops / (peak(instr) · 0.7)) · wave_factor + 3 µs

and the launches a patched model makes (:func:`recorded_launches`, also on meta tensors), the facts the kernels'
side of the formula starts from. The formula is fixed: never tuned to fit a measurement. Its output is a
prediction, never a GPU result.
"""

from __future__ import annotations

import contextlib
import math
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map_only
from torch.utils.flop_counter import flop_registry

from evit_kernels import dispatch
from evit_kernels.fp32_precision import tf32_allowed


@dataclass(frozen=True)
class Gpu:
    name: str
    bandwidth: float
    """HBM bytes per second."""
    sms: int = 132


GPUS = {"h100": Gpu("H100 SXM", 3.35e12), "h200": Gpu("H200", 4.8e12)}
PEAK_FLOPS = {"wgmma": 989e12, "mma.sync": 495e12, "tf32": 495e12, "fma": 67e12}
"""Dense peak per matrix instruction (bf16/fp16 wgmma, mma.sync or TF32, fp32 FMA)."""
MEMORY_EFFICIENCY = {16: 0.85, 8: 0.7, 4: 0.5, 2: 0.3}
"""Achievable fraction of the bandwidth by the width in bytes of a kernel's widest global access."""
EAGER_MEMORY_EFFICIENCY = 0.85
"""PyTorch's and cuDNN's kernels, whose accesses are taken to be vectorised."""
FLOP_EFFICIENCY = 0.7
LAUNCH_SECONDS = 3e-6
NO_KERNEL = {"aten._unsafe_view", "aten.empty", "aten.empty_like", "aten.empty_strided", "aten.new_empty",
             "aten.new_empty_strided"}
"""Aten ops that launch no kernel although they are not views (allocation, a view without alias annotation)."""


def seconds(gpu: Gpu, bytes_moved: float, flops: dict[str, float],
            memory_efficiency: float = EAGER_MEMORY_EFFICIENCY, wave_factor: float = 1.0) -> float:
    """The formula for one launch: the slower of moving ``bytes_moved`` and computing ``flops`` (FLOPs per
    instruction they run on: a kernel's products on its matrix instruction, its elementwise arithmetic on "fma"),
    stretched by the tail wave, plus the launch overhead."""
    memory = bytes_moved / (gpu.bandwidth * memory_efficiency)
    compute = sum(n / (PEAK_FLOPS[instruction] * FLOP_EFFICIENCY) for instruction, n in flops.items())
    return max(memory, compute) * wave_factor + LAUNCH_SECONDS


LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
"""The memory formats a model can be predicted in, by the name the command line takes."""


def memory_efficiency(width: int) -> float:
    """e_mem of a global access ``width`` bytes wide (wider than 16 bytes as 16, narrower than 2 as 2)."""
    return MEMORY_EFFICIENCY[min(max(width, 2), 16)]


def wave_factor(ctas: int, ctas_per_sm: int, gpu: Gpu) -> float:
    """ceil(w) / w with w the launch's waves: a last partial wave takes as long as a full one."""
    waves = ctas / (gpu.sms * ctas_per_sm)
    return -(-waves // 1) / waves


@dataclass(frozen=True)
class AtenCost:
    """One eager aten op: bytes read and written (every tensor argument and result), FLOPs, the matrix instruction
    the FLOPs would run on, the predicted seconds, and the innermost watched module it ran in ("" if none: see
    :func:`module_scope`)."""

    op: str
    bytes_moved: int
    flops: int
    instruction: str
    seconds: float
    module: str = ""


def eager_instruction(op: str, dtype: torch.dtype) -> str:
    """The instruction eager runs aten op ``op``'s FLOPs on: tensor cores for bf16/fp16 (wgmma on sm_90); fp32 on
    TF32 where PyTorch allows it for that kind of op (:func:`evit_kernels.fp32_precision.tf32_allowed`: on by default
    for convolutions, off for matmuls), else FMA."""
    if dtype in (torch.float16, torch.bfloat16):
        return "wgmma"
    return "tf32" if tf32_allowed("conv" if "conv" in op else "matmul") else "fma"


class EagerCounter(TorchDispatchMode):
    """Records an :class:`AtenCost` for every aten op that runs a kernel (views and metadata-only ops run none),
    attributed to the innermost module of ``scope`` (:func:`module_scope`) running at the time."""

    def __init__(self, gpu: Gpu, scope: list[str] | None = None):
        super().__init__()
        self.gpu = gpu
        self.scope = scope or [""]
        self.costs: list[AtenCost] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace == "aten" and not func.is_view and str(func.overloadpacket) not in NO_KERNEL:
            tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
            bytes_moved = sum(t.numel() * t.element_size() for t in tensors)
            formula: Callable | None = flop_registry.get(func.overloadpacket)
            flops = formula(*args, **kwargs, out_val=out) if formula is not None else 0
            instruction = eager_instruction(str(func), tensors[0].dtype) if flops else "fma"
            self.costs.append(AtenCost(str(func), bytes_moved, flops, instruction,
                                       seconds(self.gpu, bytes_moved, {instruction: flops}), self.scope[-1]))
        return out


@torch.no_grad()
def eager_costs(model: Callable[[torch.Tensor], object], x: torch.Tensor, gpu: Gpu,
                watched: list[str] = ()) -> list[AtenCost]:
    """The predicted cost of each aten op of ``model(x)`` run eagerly (``model``: a module or any function of
    ``x``), attributed to the innermost of the ``watched`` submodules running it. ``model`` and ``x`` may be on the
    meta device (shapes are all the model needs), so released models at batch 256 are counted in a fraction of a
    second on a CPU. The steady state is counted: ``model`` runs once before, so that what a served model caches
    (timm's attention-bias tables in eval mode) is not counted."""
    model(x)
    with module_scope(model, list(watched)) as scope, EagerCounter(gpu, scope) as counter:
        model(x)
    return counter.costs


@contextlib.contextmanager
def module_scope(model: torch.nn.Module, names: list[str]) -> Iterator[list[str]]:
    """Inside the block, the list yielded ends with the name of the innermost module among ``names`` (submodules of
    ``model``) running at the time, or "" outside all of them: what :class:`EagerCounter` and
    :func:`recorded_launches` attribute their records to."""
    stack = [""]

    def leave(_module, _args, _output) -> None:  # a forward hook's return value would replace the output
        stack.pop()

    handles = []
    for name in names:
        module = model.get_submodule(name)
        handles.append(module.register_forward_pre_hook(lambda _m, _a, name=name: stack.append(name)))
        handles.append(module.register_forward_hook(leave))
    try:
        yield stack
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class Launch:
    """One Triton kernel launch as a launcher requested it: the kernel, its grid, its constexprs and launch options,
    its integer arguments, the bytes spanned by the distinct tensors it is given (each input and output once), the
    evit op call that made it (its index among the op calls of the block, and the op's name) and the innermost
    watched module it ran in."""

    kernel: str
    grid: tuple[int, ...]
    constexprs: dict[str, object] = field(repr=False)
    options: dict[str, int] = field(repr=False)
    scalars: dict[str, int] = field(repr=False)
    footprint_bytes: int = 0
    op_call: int = -1
    op: str = ""
    module: str = ""
    kernel_fn: object = field(default=None, repr=False, compare=False)
    """The kernel object and its arguments as launched, for :func:`compile_facts`."""
    arguments: tuple = field(default=(), repr=False, compare=False)

    @property
    def ctas(self) -> int:
        return math.prod(self.grid)


_OPTIONS = ("num_warps", "num_stages", "maxnreg")


def materialized(tree, device: str, fill: Callable[[torch.Tensor], object] | None = None):
    """``tree`` (any nesting of lists, tuples, dicts, argument records' fields) with every meta tensor replaced by a
    real one on ``device`` of the same dtype, size, strides and offset; meta tensors sharing a storage share one.
    Storages start zeroed; ``fill``, when given, is then applied to every floating-point tensor."""
    storages: dict[int, torch.UntypedStorage] = {}

    def real(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            return t
        meta = t.untyped_storage()
        if meta._cdata not in storages:
            storages[meta._cdata] = torch.zeros(meta.nbytes(), dtype=torch.uint8, device=device).untyped_storage()
        out = torch.empty(0, dtype=t.dtype, device=device).set_(storages[meta._cdata], t.storage_offset(), t.shape,
                                                               t.stride())
        if fill is not None and out.is_floating_point():
            fill(out)
        return out

    return tree_map_only(torch.Tensor, real, tree)


def _footprint(tensors: list[torch.Tensor]) -> int:
    """Bytes spanned by the distinct storages among ``tensors`` (a stand-in passed for an absent optional tensor,
    or one tensor passed twice, counts once)."""
    spans: dict[int, int] = {}
    for t in tensors:
        key = id(t.untyped_storage())
        spans[key] = max(spans.get(key, 0), dispatch.span(t) * t.element_size())
    return sum(spans.values())


@contextlib.contextmanager
def recorded_launches(scope: list[str] | None = None) -> Iterator[list[Launch]]:
    """Inside the block, every Triton kernel launch is recorded instead of run, and the Triton backends take meta
    tensors (:func:`evit_kernels.dispatch.planning`): a patched model called on meta tensors, at full size and
    without memory or a GPU, lists the launches it would make. Outputs are left uninitialised. Each launch is
    attributed to the evit op call that made it and to the innermost module of ``scope`` (:func:`module_scope`)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []
    op_calls: list[object] = []
    scope = scope or [""]
    kernel_types = (JITFunction, InterpretedFunction)  # compiled, or run by the interpreter (TRITON_INTERPRET=1)
    original_runs = [kernel_type.run for kernel_type in kernel_types]

    def record(kernel, *args, grid, warmup, **kwargs):
        values = dict(zip(kernel.arg_names, args)) | kwargs
        tensors = [v for v in values.values() if isinstance(v, torch.Tensor)]
        launches.append(Launch(
            kernel.__name__, tuple(grid), {k: v for k, v in kwargs.items() if k not in _OPTIONS},
            {k: kwargs[k] for k in _OPTIONS if k in kwargs},
            {k: v for k, v in values.items() if isinstance(v, int) and not isinstance(v, bool) and k not in kwargs},
            _footprint(tensors), len(op_calls) - 1, op_calls[-1].op if op_calls else "", scope[-1], kernel,
            (args, kwargs)))

    for kernel_type in kernel_types:
        kernel_type.run = record
    try:
        with dispatch.planning(), dispatch.observing(lambda _backend, args: op_calls.append(args)):
            yield launches
    finally:
        for kernel_type, run in zip(kernel_types, original_runs, strict=True):
            kernel_type.run = run


@dataclass(frozen=True)
class CompileFacts:
    """What the sm_90 build of one launch's exact specialization says: registers and spilled bytes per thread (from
    ptxas), shared memory per CTA, CTAs that fit on one SM, the matrix instruction of its products, and the widest
    global load and store in bytes."""

    registers: int
    spill_bytes: int
    shared_bytes: int
    ctas_per_sm: int
    instruction: str
    widest_load: int
    widest_store: int


def _sm90():
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", 90, 32)


SM90_REGISTERS, SM90_SHARED_BYTES, SM90_THREADS, SM90_CTAS = 65536, 228 * 1024, 2048, 32
"""Per-SM limits of sm_90: 32-bit registers, shared memory, resident threads and CTAs."""


def bind(launch: Launch) -> tuple:
    """(kernel, keyword arguments, bound arguments, specialization, options) of ``launch`` as the JIT binds them for
    sm_90. Needs the compiled JIT (not ``TRITON_INTERPRET=1``); uses the JIT's own binder, the same in triton 3.6 and
    3.8 (``make test-compat``)."""
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    kernel = launch.kernel_fn
    if not isinstance(kernel, JITFunction):
        raise TypeError(f"{launch.kernel}: compile facts need the compiled JIT, not the interpreter "
                        "(unset TRITON_INTERPRET)")
    args, kwargs = launch.arguments
    kwargs = {"debug": False, **kwargs}
    binder = create_function_from_signature(kernel.signature, kernel.params, make_backend(_sm90()))
    return (kernel, kwargs, *binder(*args, **kwargs))


def specialization_key(launch: Launch) -> tuple:
    """What tells two launches' builds apart: the kernel, its specialization and its options."""
    _, _, _, specialization, options = bind(launch)
    return launch.kernel, tuple(map(str, specialization)), str(options)


def compile_facts(launch: Launch, ptxas: str) -> CompileFacts:
    """Build ``launch`` for sm_90 exactly as the JIT would specialize it on a GPU (its binder: integer arguments
    equal to 1 become constants, pointers and multiples of 16 get divisibility hints: :func:`bind`) and read the
    build (:func:`build_facts`)."""
    from triton.compiler import make_backend

    kernel, kwargs, bound, specialization, options = bind(launch)
    options, signature, constexprs, attrs = kernel._pack_args(make_backend(_sm90()), kwargs, bound, specialization,
                                                              options)
    return build_facts(kernel, signature, constexprs, options.__dict__, ptxas, attrs)


def build_facts(kernel, signature: dict, constexprs: dict, options: dict, ptxas: str,
                attrs: dict | None = None) -> CompileFacts:
    """Compile ``kernel`` for sm_90 with this signature, constexprs, options (and specialization ``attrs``), and
    read the build: ptxas for registers and spills, the metadata for shared memory, the PTX for the instruction
    and access widths. A failing ptxas raises (it prints no spill lines, never to be read as "no spills")."""
    import triton
    from triton.compiler import ASTSource

    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=_sm90(), options=options)
    ptx = compiled.asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as source:
        source.write(ptx)
        source.flush()
        run = subprocess.run([ptxas, "-arch=sm_90a", "-v", source.name, "-o", "/dev/null"], capture_output=True,
                             text=True)
    if run.returncode:
        raise RuntimeError(f"ptxas failed on {kernel.__name__}: {run.stderr[-2000:]}")
    registers = int(re.search(r"Used (\d+) registers", run.stderr).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill", run.stderr))
    shared = compiled.metadata.shared
    threads = compiled.metadata.num_warps * 32
    allocated = -(-registers // 8) * 8  # registers are allocated per thread in steps of 8
    ctas = min(SM90_THREADS // threads, SM90_REGISTERS // (allocated * threads), SM90_CTAS,
               SM90_SHARED_BYTES // shared if shared else SM90_CTAS)
    return CompileFacts(registers, spills, shared, ctas, _instruction(ptx), _widest(ptx, "ld"), _widest(ptx, "st"))


def _instruction(ptx: str) -> str:
    """The matrix instruction of ``ptx``'s products, as the formula prices them: "wgmma" (fp16/bf16 operands),
    "tf32" (TF32 operands, on either instruction), "mma.sync", or "fma" when there is none."""
    products = re.findall(r"(wgmma\.mma_async|mma\.sync)[.\w]*?\.(tf32|bf16|f16)\b", ptx)
    if any(operands == "tf32" for _, operands in products):
        return "tf32"
    if any(name == "wgmma.mma_async" for name, _ in products):
        return "wgmma"
    return "mma.sync" if products else "fma"


def _widest(ptx: str, access: str) -> int:
    """The widest global ``access`` ("ld" or "st") in ``ptx``, in bytes: vector length × element width. Loads include
    the asynchronous copies from global to shared memory (``cp.async``, its copy size in bytes), which is how
    Triton's pipelined loops read their operands."""
    widths = [int(vector or 1) * int(bits) // 8
              for vector, bits in re.findall(access + r"\.global(?:\.[\w:]+)*?(?:\.v(\d))?\.[bfsu](\d+)\s", ptx)]
    if access == "ld":
        widths += [int(size, 0) for size in re.findall(_ASYNC_COPY, ptx)]
    return max(widths, default=0)


_ASYNC_COPY = r"cp\.async\.c[ag]\.shared\.global(?:\.[\w:]+)*\s+\[[^]]*\],\s*\[[^]]*\],\s*(0x[0-9a-fA-F]+|\d+)"
"""``cp.async.{ca,cg}.shared.global [dst], [src], cp-size``: the copy size, decimal or hex."""


RELEASED = (("efficientvit_b1", 256, 224), ("efficientvit_l2", 256, 224), ("efficientvit_m4", 256, 224),
            ("efficientvit_b1", 1, 224), ("efficientvit_m4", 1, 224), ("efficientvit-sam-l0", 16, 512),
            ("sana-600m", 1, 1024), ("sana-600m", 1, 2048), ("sana-1600m", 1, 1024), ("dc-ae-f32c32-decode", 1, 1024))
"""The released configurations the performance goals name: (model, batch, resolution), bf16. The DC-AE decoder at
2048 px is left out: its prediction took 9 minutes on two cores, most of it the interpreter counting its launches."""

_LOWER_PRECISION = {torch.conv1d, torch.conv2d, torch.conv3d, torch.conv_transpose1d, torch.conv_transpose2d,
                    torch.conv_transpose3d, torch.nn.functional.linear, torch.matmul, torch.Tensor.matmul,
                    torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm, torch.bmm, torch.Tensor.bmm, torch.baddbmm,
                    torch.addmm, torch.einsum, torch.nn.functional.scaled_dot_product_attention}
"""The products CUDA autocast runs in its lower precision."""


class _AutocastProducts(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LOWER_PRECISION and torch.is_autocast_enabled("cuda"):
            dtype = torch.get_autocast_dtype("cuda")
            args, kwargs = tree_map_only(torch.Tensor, lambda t: t.to(dtype) if t.is_floating_point() else t,
                                         (args, kwargs))
        return func(*args, **kwargs)


@contextlib.contextmanager
def autocast_on_meta(dtype: torch.dtype) -> Iterator[None]:
    """``torch.autocast("cuda", dtype)`` as it acts on a GPU, for a model run on meta tensors (autocast has no meta
    device): CUDA's autocast state is on (a model's own ``torch.autocast("cuda", enabled=False)`` regions turn it
    off as they would on a GPU, and evit ops follow it), and while it is on, the products autocast lowers get their
    floating-point inputs cast to ``dtype``."""
    enabled, previous = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    try:
        with _AutocastProducts():
            yield
    finally:
        torch.set_autocast_enabled("cuda", enabled)
        torch.set_autocast_dtype("cuda", previous)


def _precision(name: str, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    from evit_kernels.bench import needs_autocast

    return autocast_on_meta(dtype) if needs_autocast(name) and dtype != torch.float32 else contextlib.nullcontext()


def patched_model(name: str, dtype: torch.dtype, memory_format: torch.memory_format = torch.contiguous_format
                  ) -> tuple[torch.nn.Module, dict[str, str]]:
    """Model ``name`` (:func:`evit_kernels.bench.build_model`) patched on every kernel that takes its inputs, on meta
    tensors of ``dtype`` (a timm or efficientsam model is patched on the CPU first: patching reads its weights), and
    the class of each outermost fused module (or fused attention processor) by name (a fused module's fused
    children, kept for its fallback, count as part of it). Its 4-D weights are laid out in ``memory_format``."""
    from evit_kernels import patch
    from evit_kernels.bench import build_model
    from evit_kernels.nn._base import FusedProcessor
    from evit_kernels.patch import FUSED_CLASSES, FUSED_PROCESSORS

    model = build_model(name, "meta")
    patch(model, backend="experimental")
    fused = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, FUSED_CLASSES)}
    # an attention module whose processor is fused counts as that processor
    fused |= {n: type(m.processor).__name__ for n, m in model.named_modules()
              if isinstance(getattr(m, FusedProcessor.HOLDER_ATTRIBUTE, None), FUSED_PROCESSORS)}
    outermost = {n: cls for n, cls in fused.items() if not any(n.startswith(f"{outer}.") for outer in fused)}
    return model.to("meta", dtype).to(memory_format=memory_format), outermost


@dataclass
class PatchedRun:
    """One steady-state call of a patched model on meta tensors (:func:`patched_run`)."""

    aten: list[AtenCost]
    """The aten ops it runs outside the kernels, priced (allocations and views free; copies and the layers left
    unpatched not)."""
    launches: list[Launch]
    """Its Triton launches; ``Launch.op_call`` indexes ``op_calls``."""
    op_calls: list
    """The argument record of every evit op call, in call order, whichever backend ran it."""
    fused: dict[str, str]
    """The outermost fused modules' classes by name (what ``aten`` and ``launches`` are attributed to)."""


@torch.no_grad()
def patched_run(name: str, batch: int, res: tuple[int, int], dtype: torch.dtype, gpu: Gpu = GPUS["h100"],
                memory_format: torch.memory_format = torch.contiguous_format) -> PatchedRun:
    """One steady-state call of :func:`patched_model` at ``batch`` × ``res``, the model and its input in
    ``memory_format``."""
    from evit_kernels.bench import input_shape

    model, fused = patched_model(name, dtype, memory_format)
    x = torch.empty(input_shape(name, batch, res), dtype=dtype, device="meta", memory_format=memory_format)
    op_calls = []
    with _precision(name, dtype):
        with recorded_launches():
            model(x)
        with module_scope(model, list(fused)) as scope, EagerCounter(gpu, scope) as counter, \
                recorded_launches(scope) as launches, dispatch.observing(lambda _backend, args: op_calls.append(args)):
            model(x)
    return PatchedRun(counter.costs, launches, op_calls, fused)


def eager_run(name: str, batch: int, res: tuple[int, int], dtype: torch.dtype, gpu: Gpu, watched: list[str],
              memory_format: torch.memory_format = torch.contiguous_format) -> list[AtenCost]:
    """:func:`eager_costs` of model ``name`` as built, unpatched, on meta tensors of ``dtype``, the model and its
    input in ``memory_format``."""
    from evit_kernels.bench import build_model, input_shape

    model = build_model(name, "meta").to("meta", dtype).to(memory_format=memory_format)
    x = torch.empty(input_shape(name, batch, res), dtype=dtype, device="meta", memory_format=memory_format)
    with _precision(name, dtype):
        return eager_costs(model, x, gpu, watched)


def model_launches(name: str, batch: int, res: int, dtype: torch.dtype = torch.bfloat16) -> list[Launch]:
    """The Triton launches of :func:`patched_run` at ``batch`` × ``res``²."""
    return patched_run(name, batch, (res, res), dtype).launches
