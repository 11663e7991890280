"""The fixed performance model (docs/performance.md, "Predicting without a GPU") and its eager side, counted on meta
tensors. Expected values are worked by hand from the formula's constants as the docs give them."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from evit_kernels import dispatch, model_prediction, predict, program_counts
from evit_kernels.ops import conv_bn_act
from evit_kernels.triton import _common as triton_common
from tests.test_triton_sm90 import PTXAS

H100 = predict.GPUS["h100"]


def test_formula_memory_bound_and_compute_bound():
    # 2.8475 GB at 3.35 TB/s · 0.85 is 1 ms; plus the 3 µs launch.
    assert predict.seconds(H100, 2.8475e9, {"wgmma": 0}) == pytest.approx(1.003e-3)
    # 692.3 TFLOP at 989 TFLOP/s · 0.7 is 1 s; the bytes take far less.
    assert predict.seconds(H100, 1e6, {"wgmma": 692.3e12}) == pytest.approx(1.000003)
    # Products on wgmma and elementwise work on FMA add up: 0.5 s + 23.45 TFLOP at 67 TFLOP/s · 0.7 = 1 s.
    assert predict.seconds(H100, 1e6, {"wgmma": 346.15e12, "fma": 23.45e12}) == pytest.approx(1.000003)
    # A 2-byte access pattern gets 0.3 of the bandwidth; a tail wave stretches the time.
    assert predict.seconds(H100, 1.005e9, {}, memory_efficiency=0.3, wave_factor=2.0) == pytest.approx(
        2 * 1.005e9 / (3.35e12 * 0.3) + 3e-6)
    assert predict.seconds(predict.GPUS["h200"], 4.08e9, {}) == pytest.approx(1.003e-3)


def test_memory_efficiency_by_access_width():
    assert [predict.memory_efficiency(w) for w in (1, 2, 4, 8, 16, 32)] == [0.3, 0.3, 0.5, 0.7, 0.85, 0.85]


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


@pytest.fixture
def regular_tiles(monkeypatch):
    """The groups-1 kernel's regular 64×64 tiles on these small maps (which would otherwise take the small-grid
    tiles), so that the counts below can be worked by hand."""
    monkeypatch.setattr(triton_common, "SMS", 0)


def test_launches_of_a_patched_call_are_recorded_not_run(regular_tiles):
    with torch.device("meta"):
        x = torch.empty(2, 32, 8, 8, dtype=torch.bfloat16)
        weight = torch.empty(80, 32, 1, 1, dtype=torch.bfloat16)
    with predict.recorded_launches() as launches:
        out = conv_bn_act(x, weight, activation="relu", backend="triton")
    assert out.shape == (2, 80, 8, 8) and out.device.type == "meta"
    (launch,) = launches
    # 128 pixels in 64-pixel blocks × 80 output channels in 64-channel blocks, one program per tile (one slice of
    # the input channels).
    assert launch.kernel == "_conv_dense_kernel" and launch.grid == (2 * 2, 1) and launch.ctas == 4
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
    x = torch.empty(16, 64, 56, 56, dtype=torch.bfloat16)  # 1568 programs: the regular 64×64 tiles
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
    # bf16 tiles go to the tensor cores as they are (docs/ops.md, "Tensor-core products").
    assert facts["instruction"] == "wgmma"
    assert 1 <= facts["ctas_per_sm"] <= 32 and facts["shared_bytes"] > 0
    assert facts["widest_load"] in (2, 4, 8, 16) and facts["widest_store"] in (2, 4, 8, 16)


def test_program_samples_spread_over_the_grid():
    assert program_counts.sample((3,)) == [(0, 0, 0), (1, 0, 0), (2, 0, 0)]
    spread = program_counts.sample((10, 20))
    assert len(spread) == 8 and spread[0] == (0, 0, 0) and spread[-1] == (9, 19, 0)
    assert len(set(spread)) == 8


def _recorded_pointwise(batch: int, out_channels: int) -> predict.Launch:
    with torch.device("meta"):
        x = torch.empty(batch, 32, 8, 8, dtype=torch.bfloat16)
        weight = torch.empty(out_channels, 32, 1, 1, dtype=torch.bfloat16)
    with predict.recorded_launches() as launches:
        conv_bn_act(x, weight, activation="relu", backend="triton")
    (launch,) = launches
    return launch


def test_counts_of_a_launch_are_its_programs_loads_stores_and_products(regular_tiles):
    """A 1×1 conv of 128 pixels, 32 → 80 channels, bf16: 2 pixel blocks × 2 output-channel blocks of 64. Each
    program reads its 64 × 32 x tile and the 32 weight rows of its channels (64, or the 16 left), multiplies
    whole tiles, and writes the output elements inside the bounds; every program runs (4 ≤ 8 samples)."""
    launch = _recorded_pointwise(batch=2, out_channels=80)
    block = {k: launch.constexprs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
    assert block["BLOCK_M"] == block["BLOCK_N"] == 64 and launch.grid == (4, 1)
    counts = program_counts.count(launch)
    assert counts.sampled_programs == 4
    assert counts.loaded_bytes == 2 * (4 * 64 * 32 + 2 * (32 * 64 + 32 * 16))
    assert counts.stored_bytes == 2 * 128 * 80
    k_steps = -(-32 // block["BLOCK_K"])
    assert counts.dot_flops == 4 * k_steps * 2 * 64 * block["BLOCK_K"] * 64


def test_counts_of_a_large_grid_come_from_a_sample_scaled_to_the_grid(regular_tiles):
    """16 identical programs (1024 pixels, 64 output channels): 8 are run, the counts are exact."""
    launch = _recorded_pointwise(batch=16, out_channels=64)
    assert launch.grid == (16, 1)
    counts = program_counts.count(launch)
    assert counts.sampled_programs == 8
    assert counts.stored_bytes == 2 * 1024 * 64
    assert counts.loaded_bytes == 2 * 16 * (64 * 32 + 32 * 64)


def test_a_launch_is_priced_by_the_formula():
    """Worked by hand: 1 GB requested, half loads at 16 B (0.85), half stores at 2 B (0.3); the footprint is
    smaller, 0.6 GB, so 0.6 GB at the weighted e_mem 1 / (0.5/0.85 + 0.5/0.3) = 0.4434; 264 CTAs at 1 per SM are
    2 waves of 132 (no tail); the products are far from the bound."""
    launch = dataclasses.replace(_recorded_pointwise(batch=2, out_channels=80), grid=(264,), footprint_bytes=6e8)
    facts = predict.CompileFacts(registers=128, spill_bytes=0, shared_bytes=0, ctas_per_sm=1, instruction="wgmma",
                                 widest_load=16, widest_store=2)
    counts = program_counts.Counts(5e8, 5e8, dot_flops=1e9, elementwise_flops=1e6, sampled_programs=8)
    priced = model_prediction.price(launch, facts, counts, H100)
    efficiency = 1 / (0.5 / 0.85 + 0.5 / 0.3)
    assert priced.hbm_bytes == 6e8 and priced.memory_efficiency == pytest.approx(efficiency)
    assert priced.wave_factor == 1.0 and priced.op == "conv_bn_act"
    assert priced.seconds == pytest.approx(6e8 / (3.35e12 * efficiency) + 3e-6)


def test_eager_costs_are_attributed_to_the_innermost_watched_module():
    inner = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 1))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), inner)
    with torch.device("meta"):
        model = model.to("meta")
        x = torch.empty(1, 3, 4, 4)
    costs = predict.eager_costs(model, x, H100, watched=["1", "1.1"])
    assert [(c.op, c.module) for c in costs] == [("aten.convolution.default", ""), ("aten.relu.default", "1"),
                                                ("aten.convolution.default", "1.1")]
    assert model(x).shape == (1, 8, 4, 4)  # the hooks are gone and never replaced an output


class _UpcastsInside(torch.nn.Module):
    """As mit-han-lab's code does: fp32 inside an autocast-disabled region, then a reduced-precision layer."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 1)

    @torch.autocast(device_type="cuda", enabled=False)
    def upcast(self, x):
        return x.float() * 2

    def forward(self, x):
        return self.conv(self.upcast(x))


def test_autocast_on_meta_acts_as_cuda_autocast():
    model = _UpcastsInside().to("meta", torch.bfloat16)
    x = torch.empty(1, 4, 2, 2, dtype=torch.bfloat16, device="meta")
    with pytest.raises(RuntimeError, match="should be the same"):
        model(x)
    with predict.autocast_on_meta(torch.bfloat16):
        assert model(x).dtype == torch.bfloat16
        # evit ops follow CUDA's autocast state on meta tensors: an fp32 input is cast like the weight's dtype
        out = conv_bn_act(x.float(), model.conv.weight, model.conv.bias)
        assert out.dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cuda")


@pytest.mark.slow
@pytest.mark.skipif(PTXAS is None, reason="needs ptxas (CUDA toolkit)")
def test_predict_command_prices_every_launch(tmp_path):
    """The command on a small model: every launch carries its build facts and counts, and the totals add up. At 192
    px its DSConv's 96×96 map makes a wave of tiles for the spatial-conv-and-projection kernel."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "b0.json"
    run = subprocess.run([sys.executable, "-m", "evit_kernels", "predict", "--model", "efficientvit_b0", "--batch", "1",
                          "--res", "192", "192", "--gpu", "h200", "--ptxas", PTXAS, "--json", str(out)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "PREDICTION" in run.stdout and "_conv_project_fwd_kernel" in run.stdout
    p = json.loads(out.read_text())
    assert p["gpu"] == "H200" and "commit" in p and p["launches"]
    for launch in p["launches"]:
        assert launch["facts"]["spill_bytes"] == 0 and launch["op"] and launch["module"]
        call = p["op_calls"][str(launch["op_call"])]
        assert call["op"] == launch["op"] and call["useful_flops"] > 0
        assert launch["counts"]["stored_bytes"] > 0 and launch["hbm_bytes"] <= launch["footprint_bytes"]
        assert launch["seconds"] > 3e-6
    assert p["patched_ms"] == pytest.approx(sum(x["seconds"] for x in p["launches"]) * 1e3 + p["patched_aten_ms"])
    assert sum(m["eager_ms"] for m in p["modules"].values()) == pytest.approx(p["eager_ms"])
    # Each fused module's own times add up to its class's, and the text lists those slower than their eager ops.
    for cls, m in p["modules"].items():
        mine = [i for i in p["instances"].values() if i["class"] == cls]
        assert len(mine) == m["instances"]
        for side in ("eager_ms", "patched_ms"):
            assert sum(i[side] for i in mine) == pytest.approx(m[side] if cls else 0.0)
    slower = [name for name, i in p["instances"].items() if i["patched_ms"] > i["eager_ms"]]
    assert (f"fused modules predicted slower than the eager ops they replace: {len(slower)} of "
            f"{len(p['instances'])}") in run.stdout
    assert all(name in run.stdout for name in slower)
    # The eager side is the unpatched model's, counted on its own.
    with torch.device("meta"):
        model = timm.create_model("efficientvit_b0").eval().to(torch.bfloat16)
        x = torch.empty(1, 3, 192, 192, dtype=torch.bfloat16)
    eager = predict.eager_costs(model, x, predict.GPUS["h200"])
    assert p["eager_ms"] == pytest.approx(sum(c.seconds for c in eager) * 1e3)


def test_access_widths_and_matrix_instruction_are_read_from_the_ptx():
    ptx = """
        ld.global.L1::evict_last.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];
        ld.global.nc.b16 %rs1, [%rd2];
        st.global.v2.b16 [%rd3], {%rs1, %rs2};
        @%p1 st.global.b32 [%rd4], %r5;
    """
    assert predict._widest(ptx, "ld") == 16 and predict._widest(ptx, "st") == 4
    assert predict._widest("", "ld") == 0
    # A pipelined loop's operands: asynchronous copies of 16 (hex) and 4 bytes into shared memory are loads.
    copies = """
        ld.global.b16 %rs1, [%rd2];
        @%p2 cp.async.cg.shared.global [ %r185 + 0 ], [ %rd13 + 0 ], 0x10, %r186;
        cp.async.ca.shared.global [%r7], [%rd8], 4, %r9;
    """
    assert predict._widest(copies, "ld") == 16 and predict._widest(copies, "st") == 0
    assert predict._widest(copies.replace("0x10", "8"), "ld") == 8
    wgmma = "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f1}, %rd1, %rd2, 1, 1, 1, 0, 1;"
    tf32 = "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%f1}, {%r1}, {%r2}, {%f2};"
    fp16 = "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%f1}, {%r1}, {%r2}, {%f2};"
    assert predict._instruction(ptx + wgmma) == "wgmma"
    assert predict._instruction(wgmma + tf32) == "tf32"
    assert predict._instruction(fp16) == "mma.sync"
    assert predict._instruction(ptx) == "fma"


def test_diffusers_models_have_the_released_sizes_and_shapes():
    """Built on meta from their configurations: Sana 600M and 1600M have the parameter counts the Sana paper gives
    (0.59 B and 1.6 B), and map a 1024 px latent (32 channels, 32×32) to one of the same shape; the DC-AE decoder
    makes the 1024×1024 RGB image of it."""
    from evit_kernels.bench import build_model, input_shape

    latent = input_shape("sana-600m", 2, (1024, 512))
    assert latent == (2, 32, 32, 16) == input_shape("dc-ae-f32c32-decode", 2, (1024, 512))
    with pytest.raises(ValueError, match="multiple of 32"):
        input_shape("sana-600m", 1, (1000, 1000))
    x = torch.empty(latent, dtype=torch.bfloat16, device="meta")
    for name, params in (("sana-600m", 0.59e9), ("sana-1600m", 1.6e9)):
        model = build_model(name, "meta").to(torch.bfloat16)
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=0.02), name
        assert model(x).shape == latent
    decoder = build_model("dc-ae-f32c32-decode", "meta").to(torch.bfloat16)
    assert decoder(x).shape == (2, 3, 1024, 512)


def test_sana_video_model_has_the_released_size_and_shapes():
    """SANA-Video 2B built on meta: about 2 B parameters, 81 frames at 480×832 as a 16×21×60×104 latent (32 760
    tokens of 2×2 latent pixels), mapped to one of the same shape."""
    from evit_kernels.bench import build_model, input_shape

    latent = input_shape("sana-video-2b", 1, (480, 832))
    assert latent == (1, 16, 21, 60, 104)
    with pytest.raises(ValueError, match="multiple of 16"):
        input_shape("sana-video-2b", 1, (480, 840))
    model = build_model("sana-video-2b", "meta").to(torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(2.0e9, rel=0.05)
    assert model(torch.empty(latent, dtype=torch.bfloat16, device="meta")).shape == latent


@pytest.mark.parametrize("name, blocks", [("sana-600m", 28), ("sana-1600m", 20)])
def test_sana_prediction_runs_every_self_attention_on_the_kernel(name, blocks):
    """At 256 px (an 8×8 latent): each block's self-attention is one fused processor, launching the token-major
    linear attention; the eager side charges every one of those attention modules."""
    run = predict.patched_run(name, 1, (256, 256), torch.bfloat16)
    attention = {n for n, cls in run.fused.items() if cls == "FusedSanaLinearAttnProcessor"}
    assert attention == {f"transformer.transformer_blocks.{i}.attn1" for i in range(blocks)}
    ops = [launch.op for launch in run.launches if launch.module in attention]
    assert ops and set(ops) == {"relu_linear_attention_tokens"}
    assert {launch.module for launch in run.launches if launch.module in attention} == attention
    eager = predict.eager_run(name, 1, (256, 256), torch.bfloat16, H100, list(run.fused))
    assert {c.module for c in eager if c.seconds > 0} >= attention


def test_dc_ae_decode_prediction_fuses_every_linear_attention():
    """The released f32c32 decoder has three EfficientViT stages of three blocks: nine multi-scale linear
    attentions, each launching its kernels."""
    run = predict.patched_run("dc-ae-f32c32-decode", 1, (256, 256), torch.bfloat16)
    attention = {n for n, cls in run.fused.items() if cls == "FusedSanaMultiscaleLinearAttention"}
    assert len(attention) == 9
    assert {launch.module for launch in run.launches if launch.module in attention} == attention


@pytest.mark.slow
@pytest.mark.skipif(PTXAS is None, reason="needs ptxas (CUDA toolkit)")
def test_predict_command_on_a_diffusers_model(tmp_path):
    """The command on Sana 600M by its name, at 256 px: every launch priced, totals adding up, and the fused attention's
    row in the module table. (The DC-AE decoder's launches are built in tests/test_triton_sm90.py, its fused
    attentions checked by the test above: through the command it took CI two minutes more.)"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "p.json"
    run = subprocess.run([sys.executable, "-m", "evit_kernels", "predict", "--model", "sana-600m", "--batch",
                          "1", "--res", "256", "256", "--ptxas", PTXAS, "--json", str(out)],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "PREDICTION" in run.stdout and "_rla_fwd_one_pass_kernel" in run.stdout
    p = json.loads(out.read_text())
    assert p["res"] == [256, 256] and p["launches"]
    assert all(launch["facts"]["spill_bytes"] == 0 and launch["seconds"] > 3e-6 for launch in p["launches"])
    assert p["patched_ms"] == pytest.approx(sum(x["seconds"] for x in p["launches"]) * 1e3 + p["patched_aten_ms"])
    assert sum(m["eager_ms"] for m in p["modules"].values()) == pytest.approx(p["eager_ms"])
    assert p["modules"]["FusedSanaLinearAttnProcessor"]["instances"] == 28
