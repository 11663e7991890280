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
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

from evit_kernels import dispatch


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


def seconds(gpu: Gpu, bytes_moved: float, flops: float, instruction: str,
            memory_efficiency: float = EAGER_MEMORY_EFFICIENCY, wave_factor: float = 1.0) -> float:
    """The formula for one launch: the slower of moving ``bytes_moved`` and computing ``flops`` on
    ``instruction``'s units, stretched by the tail wave, plus the launch overhead."""
    memory = bytes_moved / (gpu.bandwidth * memory_efficiency)
    compute = flops / (PEAK_FLOPS[instruction] * FLOP_EFFICIENCY)
    return max(memory, compute) * wave_factor + LAUNCH_SECONDS


def wave_factor(ctas: int, ctas_per_sm: int, gpu: Gpu) -> float:
    """ceil(w) / w with w the launch's waves: a last partial wave takes as long as a full one."""
    waves = ctas / (gpu.sms * ctas_per_sm)
    return -(-waves // 1) / waves


@dataclass(frozen=True)
class AtenCost:
    """One eager aten op: bytes read and written (every tensor argument and result), FLOPs, the matrix instruction
    the FLOPs would run on, and the predicted seconds."""

    op: str
    bytes_moved: int
    flops: int
    instruction: str
    seconds: float


def eager_instruction(op: str, dtype: torch.dtype) -> str:
    """The instruction eager runs aten op ``op``'s FLOPs on: tensor cores for bf16/fp16 (wgmma on sm_90); fp32 on
    TF32 where PyTorch allows it for that kind of op (``torch.backends.cudnn.allow_tf32`` for convolutions, on by
    default; ``torch.backends.cuda.matmul.allow_tf32`` for matmuls, off by default), else FMA."""
    if dtype in (torch.float16, torch.bfloat16):
        return "wgmma"
    allowed = torch.backends.cudnn.allow_tf32 if "conv" in op else torch.backends.cuda.matmul.allow_tf32
    return "tf32" if allowed else "fma"


class EagerCounter(TorchDispatchMode):
    """Records an :class:`AtenCost` for every aten op that runs a kernel (views and metadata-only ops run none)."""

    def __init__(self, gpu: Gpu):
        super().__init__()
        self.gpu = gpu
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
                                       seconds(self.gpu, bytes_moved, flops, instruction)))
        return out


@torch.no_grad()
def eager_costs(model: Callable[[torch.Tensor], object], x: torch.Tensor, gpu: Gpu) -> list[AtenCost]:
    """The predicted cost of each aten op of ``model(x)`` run eagerly (``model``: a module or any function of
    ``x``). ``model`` and ``x`` may be on the meta device (shapes are all the model needs), so released models at
    batch 256 are counted in a fraction of a second on a CPU. The steady state is counted: ``model`` runs once
    before, so that what a served model caches (timm's attention-bias tables in eval mode) is not counted."""
    model(x)
    with EagerCounter(gpu) as counter:
        model(x)
    return counter.costs


@dataclass(frozen=True)
class Launch:
    """One Triton kernel launch as a launcher requested it: the kernel, its grid, its constexprs and launch options,
    its integer arguments, and the bytes spanned by the distinct tensors it is given (each input and output once)."""

    kernel: str
    grid: tuple[int, ...]
    constexprs: dict[str, object] = field(repr=False)
    options: dict[str, int] = field(repr=False)
    scalars: dict[str, int] = field(repr=False)
    footprint_bytes: int = 0
    kernel_fn: object = field(default=None, repr=False, compare=False)
    """The kernel object and its arguments as launched, for :func:`compile_facts`."""
    arguments: tuple = field(default=(), repr=False, compare=False)

    @property
    def ctas(self) -> int:
        return math.prod(self.grid)


_OPTIONS = ("num_warps", "num_stages")


def _footprint(tensors: list[torch.Tensor]) -> int:
    """Bytes spanned by the distinct storages among ``tensors`` (a stand-in passed for an absent optional tensor,
    or one tensor passed twice, counts once)."""
    spans: dict[int, int] = {}
    for t in tensors:
        key = id(t.untyped_storage())
        spans[key] = max(spans.get(key, 0), dispatch.span(t) * t.element_size())
    return sum(spans.values())


@contextlib.contextmanager
def recorded_launches() -> Iterator[list[Launch]]:
    """Inside the block, every Triton kernel launch is recorded instead of run, and the Triton backends take meta
    tensors (:func:`evit_kernels.dispatch.planning`): a patched model called on meta tensors, at full size and
    without memory or a GPU, lists the launches it would make. Outputs are left uninitialised."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []
    kernel_types = (JITFunction, InterpretedFunction)  # compiled, or run by the interpreter (TRITON_INTERPRET=1)
    original_runs = [kernel_type.run for kernel_type in kernel_types]

    def record(kernel, *args, grid, warmup, **kwargs):
        values = dict(zip(kernel.arg_names, args)) | kwargs
        tensors = [v for v in values.values() if isinstance(v, torch.Tensor)]
        launches.append(Launch(
            kernel.__name__, tuple(grid), {k: v for k, v in kwargs.items() if k not in _OPTIONS},
            {k: kwargs[k] for k in _OPTIONS if k in kwargs},
            {k: v for k, v in values.items() if isinstance(v, int) and not isinstance(v, bool) and k not in kwargs},
            _footprint(tensors), kernel, (args, kwargs)))

    for kernel_type in kernel_types:
        kernel_type.run = record
    try:
        with dispatch.planning():
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
    """The widest global ``access`` ("ld" or "st") in ``ptx``, in bytes: vector length × element width."""
    widths = [int(vector or 1) * int(bits) // 8
              for vector, bits in re.findall(access + r"\.global(?:\.[a-z_]+)*?(?:\.v(\d))?\.[bfsu](\d+)\s", ptx)]
    return max(widths, default=0)


RELEASED = (("efficientvit_b1", 256, 224), ("efficientvit_l2", 256, 224), ("efficientvit_m4", 256, 224),
            ("efficientvit_b1", 1, 224), ("efficientvit_m4", 1, 224))
"""The released timm configurations the performance goals name: (model, batch, resolution), bf16. The SAM-L0
encoder is not among them yet: mit-han-lab's code casts to fp32 inside and runs in bf16 only under autocast, which
meta tensors do not have."""


def model_launches(name: str, batch: int, res: int, dtype: torch.dtype = torch.bfloat16) -> list[Launch]:
    """The Triton launches of ``name`` patched (every kernel where it takes the inputs) at ``batch`` × ``res``²: built
    with random weights on the CPU, patched there (patching reads the weights), then moved to meta tensors."""
    from evit_kernels import patch
    from evit_kernels.bench import build_model

    model = build_model(name)
    patch(model, backend="experimental")
    model = model.to("meta", dtype)
    with torch.no_grad(), recorded_launches() as launches:
        model(torch.empty(batch, 3, res, res, dtype=dtype, device="meta"))
    return launches
