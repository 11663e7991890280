"""The fixed performance model (docs/performance.md, "Predicting without a GPU") and its eager side, counted on meta
tensors. Expected values are worked by hand from the formula's constants as the docs give them."""

import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from evit_kernels import dispatch, predict
from evit_kernels.ops import conv_bn_act
from tests.test_triton_sm90 import PTXAS

H100 = predict.GPUS["h100"]


def test_formula_memory_bound_and_compute_bound():
    # 2.8475 GB at 3.35 TB/s · 0.85 is 1 ms; plus the 3 µs launch.
    assert predict.seconds(H100, 2.8475e9, 0, "wgmma") == pytest.approx(1.003e-3)
    # 692.3 TFLOP at 989 TFLOP/s · 0.7 is 1 s; the bytes take far less.
    assert predict.seconds(H100, 1e6, 692.3e12, "wgmma") == pytest.approx(1.000003)
    # A 2-byte access pattern gets 0.3 of the bandwidth; a tail wave stretches the time.
    assert predict.seconds(H100, 1.005e9, 0, "fma", memory_efficiency=0.3, wave_factor=2.0) == pytest.approx(
        2 * 1.005e9 / (3.35e12 * 0.3) + 3e-6)
    assert predict.seconds(predict.GPUS["h200"], 4.08e9, 0, "fma") == pytest.approx(1.003e-3)


def test_wave_factor():
    assert predict.wave_factor(264, 2, H100) == 1.0
    assert predict.wave_factor(133, 1, H100) == pytest.approx(2 / (133 / 132))


def test_eager_conv_counts_its_bytes_and_flops():
    with torch.device("meta"):
        x = torch.empty(8, 16, 32, 32, dtype=torch.bfloat16)
        w = torch.empty(32, 16, 3, 3, dtype=torch.bfloat16)
        conv = torch.nn.Conv2d(16, 32, 3, padding=1, bias=False).to(torch.bfloat16)
    conv.weight = torch.nn.Parameter(w)
    (cost,) = predict.eager_costs(conv, x, H100)
    assert cost.op == "aten.convolution.default" and cost.instruction == "wgmma"
    assert cost.bytes_moved == 2 * (8 * 16 * 32 * 32 + 32 * 16 * 9 + 8 * 32 * 32 * 32)
    assert cost.flops == 2 * (8 * 32 * 32 * 32) * (16 * 9)


def test_views_and_allocations_cost_nothing_copies_do():
    def fn(x):
        y = x.view(4, 64).permute(1, 0).reshape(256)  # flattening a non-contiguous view copies
        return torch.empty_like(y), y

    with torch.device("meta"):
        x = torch.empty(16, 16)
    costs = predict.eager_costs(fn, x, H100)
    assert [c.op for c in costs] == ["aten.clone.default"]
    assert costs[0].bytes_moved == 2 * 256 * 4


def test_fp32_instruction_follows_pytorch_settings():
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        with torch.backends.cudnn.flags(allow_tf32=True):
            torch.backends.cuda.matmul.allow_tf32 = False
            assert predict.eager_instruction("aten.convolution.default", torch.float32) == "tf32"
            assert predict.eager_instruction("aten.mm.default", torch.float32) == "fma"
            torch.backends.cuda.matmul.allow_tf32 = True
            assert predict.eager_instruction("aten.mm.default", torch.float32) == "tf32"
        with torch.backends.cudnn.flags(allow_tf32=False):
            assert predict.eager_instruction("aten.convolution.default", torch.float32) == "fma"
        assert predict.eager_instruction("aten.mm.default", torch.bfloat16) == "wgmma"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32


@pytest.mark.slow
def test_released_model_at_batch_256_is_counted_on_meta_tensors():
    with torch.device("meta"):
        model = timm.create_model("efficientvit_b1").eval().to(torch.bfloat16)
        x = torch.empty(256, 3, 224, 224, dtype=torch.bfloat16)
    costs = predict.eager_costs(model, x, H100)
    with FlopCounterMode(display=False) as flops, torch.no_grad():
        model(x)
    assert sum(c.flops for c in costs) == flops.get_total_flops()
    # Every eager op is one launch: the prediction is at least the launch overheads and the bytes at full speed.
    total = sum(c.seconds for c in costs)
    assert total >= len(costs) * 3e-6 + sum(c.bytes_moved for c in costs) / (3.35e12 * 0.85)


def test_launches_of_a_patched_call_are_recorded_not_run():
    with torch.device("meta"):
        x = torch.empty(2, 32, 8, 8, dtype=torch.bfloat16)
        weight = torch.empty(80, 32, 1, 1, dtype=torch.bfloat16)
    with predict.recorded_launches() as launches:
        out = conv_bn_act(x, weight, activation="relu", backend="triton")
    assert out.shape == (2, 80, 8, 8) and out.device.type == "meta"
    (launch,) = launches
    # 128 pixels in 64-pixel blocks × 80 output channels in 64-channel blocks, one program per tile.
    assert launch.kernel == "_conv_pw_kernel" and launch.grid == (2 * 2,) and launch.ctas == 4
    assert launch.constexprs["ACTIVATION"] == "relu"
    # x, weight and the output once each (the weight also stands in for the absent bias, the output for the absent
    # residual): 2·32·64 + 80·32 + 2·80·64 bf16 elements.
    assert launch.footprint_bytes == 2 * (2 * 32 * 64 + 80 * 32 + 2 * 80 * 64)
    assert launch.scalars["in_channels"] == 32 and launch.scalars["n_pixels"] == 128


def test_outside_the_block_meta_tensors_are_refused_and_kernels_run():
    with torch.device("meta"):
        x = torch.empty(2, 32, 8, 8)
        weight = torch.empty(80, 32, 1, 1)
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    runs = (JITFunction.run, InterpretedFunction.run)
    with predict.recorded_launches():
        assert (JITFunction.run, InterpretedFunction.run) != runs
    assert (JITFunction.run, InterpretedFunction.run) == runs
    with pytest.raises(dispatch.BackendUnavailable, match="tensors on meta"):
        conv_bn_act(x, weight, backend="triton")


def test_eager_costs_count_the_steady_state():
    """timm's EfficientViT-M caches its attention-bias tables on the first eval call: counted once warm, the two
    GPUs' counts agree op for op."""
    with torch.device("meta"):
        model = timm.create_model("efficientvit_m0").eval()
        x = torch.empty(1, 3, 224, 224)
    h100 = predict.eager_costs(model, x, H100)
    h200 = predict.eager_costs(model, x, predict.GPUS["h200"])
    assert [c.op for c in h100] == [c.op for c in h200]


_FACTS_SCRIPT = """
import json, sys, torch
from evit_kernels import predict
from evit_kernels.ops import conv_bn_act
from tests.test_triton_sm90 import PTXAS
with torch.device("meta"):
    x = torch.empty(4, 64, 28, 28, dtype=torch.bfloat16)
    weight = torch.empty(128, 64, 1, 1, dtype=torch.bfloat16)
with predict.recorded_launches() as launches:
    conv_bn_act(x, weight, activation="relu", backend="triton")
(launch,) = launches
print(json.dumps(predict.compile_facts(launch, sys.argv[1]).__dict__))
"""


@pytest.mark.slow
@pytest.mark.skipif(PTXAS is None, reason="needs ptxas (CUDA toolkit)")
def test_compile_facts_of_a_recorded_launch():
    """The sm_90 build of what a launch would run, read without a GPU (in a process without the interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _FACTS_SCRIPT, PTXAS], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    facts = json.loads(run.stdout.splitlines()[-1])
    assert facts["spill_bytes"] == 0 and 0 < facts["registers"] <= 255
    # The bf16 1×1 kernel upcasts its tiles to fp32 before tl.dot: TF32 products (docs/ops.md, conv_bn_act).
    assert facts["instruction"] == "tf32"
    assert 1 <= facts["ctas_per_sm"] <= 32 and facts["shared_bytes"] > 0
    assert facts["widest_load"] in (2, 4, 8, 16) and facts["widest_store"] in (2, 4, 8, 16)
