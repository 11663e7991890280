"""The CUDA backend of evit::cascaded_group_attention (csrc/cascaded_group_attention_cuda.cu, exposed as
evit::cga_window_cuda): on a GPU, every released EfficientViT M0-M5 attention against a float64 reference; here,
without a GPU, its registration, fake (meta) implementation and refusals."""

from __future__ import annotations

import pytest
import torch

from evit_kernels import _extension, dispatch
from evit_kernels.ops.cascaded_group_attention import (
    H100_SHARED_MEMORY_PER_BLOCK,
    OP,
    CascadedGroupAttentionArgs,
    cascaded_group_attention,
    cascaded_group_attention_reference,
    cuda_shared_memory_bytes,
)
from tests.cga_configs import CONFIGS, KEY_DIM, RELEASED, cast, folded_inputs, whole_map_terms
from tests.numerics import assert_within_twice_eager, in_layout, poison_next_allocation

needs_extension = pytest.mark.skipif(_extension.load_error() is not None,
                                     reason=f"evit_kernels._C is not built: {_extension.load_error()}")

# (H, W, window): the 224 px stage maps (14×14: four windows; 7×7: one; 4×4: stage 3, whose attention is built
# with a 4×4 window) and maps that need zero padding (9×11 → 14×14, 8×8 → 14×14, 5×6 → 8×8).
MAPS = [(14, 14, 7), (7, 7, 7), (4, 4, 4), (9, 11, 7), (8, 8, 7), (5, 6, 4)]


# --- on a GPU ------------------------------------------------------------------------------------------------

@pytest.mark.numerics
@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("H, W, window", MAPS)
@pytest.mark.parametrize("config", CONFIGS)
def test_released_attentions_within_twice_eager_error(config, H, W, window, dtype):
    args = folded_inputs(config, H, W, window, dtype, "cuda")
    expected = cascaded_group_attention_reference(CascadedGroupAttentionArgs(*cast(args, torch.float64)))
    with torch.no_grad():
        eager = cascaded_group_attention(*args, backend="torch")
        poisoned = poison_next_allocation(expected.shape, dtype)
        out = cascaded_group_attention(*args, backend="cuda")
    assert out.data_ptr() == poisoned, "the output did not reuse the NaN-poisoned block"
    assert out.dtype == dtype and out.shape == expected.shape and out.is_contiguous()
    assert torch.isfinite(out).all()
    assert_within_twice_eager(out, eager, expected, dtype, whole_map_terms(config, window))


def _check_extension_op(args, config, dtype):
    """evit::cga_window_cuda on ``args`` (7×7 windows): contiguous, finite, and within twice eager's error of the
    float64 reference."""
    expected = cascaded_group_attention_reference(CascadedGroupAttentionArgs(*cast(args, torch.float64)))
    eager = cascaded_group_attention_reference(CascadedGroupAttentionArgs(*args))
    out = torch.ops.evit.cga_window_cuda(*args)
    assert out.is_contiguous() and torch.isfinite(out).all()
    assert_within_twice_eager(out, eager, expected, dtype, whole_map_terms(config, 7))


@pytest.mark.numerics
@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_strided_input(layout, dtype):
    """channels_last maps and maps with no dense layout are read through their strides."""
    config = (192, 3, (7, 5, 3))
    args = list(folded_inputs(config, 9, 11, 7, dtype, "cuda", batch=3))
    args[0] = in_layout(args[0], layout)
    _check_extension_op(args, config, dtype)


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in a view that starts one element into its storage: 2 bytes past a 32-byte boundary."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = flat[1:].view(t.shape)
    view.copy_(t)
    return view


@pytest.mark.numerics
@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config, misaligned", [
    ((192, 3, (7, 5, 3)), True),  # the tensor-core kernel, its weight tiles read from 32-byte-aligned copies
    ((72, 3, (5, 3, 3)), False),  # value dim 24, no multiple of 16: the scalar kernel in fp16/bf16
])
def test_misaligned_weights_and_the_scalar_kernel_in_half_precision(config, misaligned, dtype):
    args = list(folded_inputs(config, 9, 11, 7, dtype, "cuda", batch=2))
    if misaligned:
        args[1] = [_misaligned(w) for w in args[1]]
        args[6] = _misaligned(args[6])
        assert args[6].data_ptr() % 32 != 0
    _check_extension_op(args, config, dtype)


@pytest.mark.numerics
@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [2, 10, 20, 64])
def test_windows_split_over_clusters_or_not(batch, dtype):
    """The tensor-core kernel puts 4, 2 or 1 CTAs on each window as the windows fill the GPU (on 132 SMs, 14×14
    maps of 4 windows: batch 2 and 10 run in clusters of 4 and 2, batch 20 and 64 one CTA a window): each way must
    give the reference's answer."""
    config = (256, 4, (7, 5, 3, 3))
    _check_extension_op(folded_inputs(config, 14, 14, 7, dtype, "cuda", batch=batch), config, dtype)


@pytest.mark.gpu
@needs_extension
def test_opcheck_on_gpu():
    args = folded_inputs((64, 4, (5, 5, 5, 5)), 9, 11, 7, torch.float32, "cuda")
    torch.library.opcheck(torch.ops.evit.cga_window_cuda, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.gpu
@needs_extension
def test_empty_batch():
    args = folded_inputs((64, 4, (5, 5, 5, 5)), 7, 7, 7, torch.float16, "cuda", batch=0)
    with torch.no_grad():
        assert cascaded_group_attention(*args, backend="cuda").shape == (0, 64, 7, 7)


# --- without a GPU ---------------------------------------------------------------------------------------------

def test_released_configurations_match_timm():
    timm = pytest.importorskip("timm")
    for name, stages in RELEASED.items():
        model = timm.create_model(f"efficientvit_{name}", pretrained=False)
        found = {(a.val_dim * a.num_heads, a.num_heads, tuple(dw.conv.kernel_size[0] for dw in a.dws))
                 for a in model.modules() if type(a).__name__ == "CascadedGroupAttention"}
        assert found == set(stages), name
        assert {a.key_dim for a in model.modules() if type(a).__name__ == "CascadedGroupAttention"} == {KEY_DIM}


@needs_extension  # the reasons ask evit_kernels._C for the kernel's shared memory
def test_every_released_configuration_fits_in_shared_memory_and_is_accepted():
    reasons = dispatch.get(OP, "cuda").input_reasons
    for config in CONFIGS:
        channels, heads, _ = config
        for dtype, arch_major in [(torch.float32, 9), (torch.bfloat16, 9), (torch.float16, 8), (torch.float16, 7)]:
            assert cuda_shared_memory_bytes(7, heads, channels // heads, KEY_DIM, channels // heads, channels, dtype,
                                            arch_major) <= H100_SHARED_MEMORY_PER_BLOCK
        with torch.no_grad():
            inputs = CascadedGroupAttentionArgs(*folded_inputs(config, 9, 11, 7, torch.float16, "cpu", batch=1))
            assert reasons(inputs) == ["tensors on cpu (the cuda kernels need CUDA tensors)"]


@needs_extension
def test_shared_memory_is_the_launchers_own_count():
    """evit_kernels._C owns the count (the kernel's layout sizes the launch) and the choice of kernel; no GPU is
    needed to ask for them. M0's first stage, 7×7 windows, 4 heads of 16 channels (key_dim 16):

    - the fp32 scalar kernel (fp32, or fp16/bf16 before sm_80): 49 tokens × (16 input + 2·16 + 16 qkv + 16 q + 4·16
      head outputs) + 49×49 attention, 4 bytes each;
    - the tensor-core kernel (fp16/bf16 from sm_80), tokens padded to 64, each array at a multiple of 128 bytes:
      16×64 input (2 bytes), 16×64 q before its conv (4), 16×64 each of q, k, v (2), 49×49 logits (4: 9604 bytes,
      9728 aligned), 64×64 probabilities (2), 4·16×64 head outputs (2), and 16 warps' 16×16 fp32 scratch tiles."""
    assert str(torch.ops.evit.cga_window_cuda_shared_memory_bytes.default._schema) == (
        "evit::cga_window_cuda_shared_memory_bytes(int window, int heads, int in_width, int key_dim, int val_dim, "
        "int out_channels, ScalarType dtype, int arch_major) -> int")
    scalar = 4 * (49 * 144 + 49 * 49)
    assert cuda_shared_memory_bytes(7, 4, 16, KEY_DIM, 16, 64, torch.float32, 9) == scalar
    assert cuda_shared_memory_bytes(7, 4, 16, KEY_DIM, 16, 64, torch.bfloat16, 7) == scalar
    tensor_cores = 2048 + 4096 + 3 * 2048 + 9728 + 8192 + 8192 + 16 * 1024
    for dtype in (torch.bfloat16, torch.float16):
        assert cuda_shared_memory_bytes(7, 4, 16, KEY_DIM, 16, 64, dtype, 9) == tensor_cores
        assert cuda_shared_memory_bytes(7, 4, 16, KEY_DIM, 16, 64, dtype, 8) == tensor_cores
    # A dimension that is no multiple of 16 (the output channels here) keeps the scalar kernel.
    assert cuda_shared_memory_bytes(7, 4, 16, KEY_DIM, 16, 72, torch.bfloat16, 9) == scalar


@needs_extension
def test_schema_and_meta_implementation_are_registered():
    schema = str(torch.ops.evit.cga_window_cuda.default._schema)
    assert schema == ("evit::cga_window_cuda(Tensor x, Tensor[] qkv_w, Tensor[] qkv_b, Tensor[] dw_w, Tensor[] dw_b, "
                      "Tensor attention_biases, Tensor proj_w, Tensor proj_b, int key_dim, int window) -> Tensor")
    args = folded_inputs((144, 3, (7, 5, 3)), 9, 11, 7, torch.bfloat16, "meta", batch=3)
    out = torch.ops.evit.cga_window_cuda(*args)
    assert out.shape == (3, 144, 9, 11) and out.dtype == torch.bfloat16 and out.device.type == "meta"


@needs_extension
def test_extension_op_rejects_cpu_tensors():
    args = folded_inputs((64, 4, (5, 5, 5, 5)), 7, 7, 7, torch.float32, "cpu", batch=1)
    with pytest.raises(NotImplementedError, match="cga_window_cuda"):
        torch.ops.evit.cga_window_cuda(*args)


def _reasons(args) -> str:
    return "; ".join(dispatch.get(OP, "cuda").input_reasons(CascadedGroupAttentionArgs(*args)))


def test_reasons_refuse_cpu_tensors_and_gradients():
    args = folded_inputs((64, 4, (5, 5, 5, 5)), 7, 7, 7, torch.float32, "cpu", batch=1, requires_grad=True)
    refused = _reasons(args)
    assert "tensors on cpu" in refused and "inference-only kernel" in refused
    with torch.no_grad():
        assert "inference-only" not in _reasons(args)
    with torch.inference_mode():
        assert "inference-only" not in _reasons(args)


@pytest.mark.parametrize("change, message", [
    (dict(dtype=torch.float64), "torch.float64 inputs"),
    (dict(window=9), "window 9×9 > 8×8"),
    (dict(key_dim=8), "key_dim 8"),
    (dict(config=(288, 2, (7, 5))), "value dim 144 outside 1..128"),
    (dict(config=(64, 4, (5, 9, 5, 5))), "depthwise kernel sizes [5, 9]"),
    (dict(config=(144, 9, (3,) * 9)), "9 heads > 8"),
    # The shared memory a window needs is the extension's own count.
    pytest.param(dict(config=(1024, 8, (3,) * 8), window=8), "bytes of shared memory per window",
                 marks=needs_extension),
])
def test_reasons_refuse_unsupported_shapes(change, message):
    config, window = change.get("config", (64, 4, (5, 5, 5, 5))), change.get("window", 7)
    args = list(folded_inputs(config, 7, 7, window, change.get("dtype", torch.float32), "cpu", batch=1))
    if "key_dim" in change:
        heads, kd = config[1], change["key_dim"]
        args[1] = [w[2 * (KEY_DIM - kd):] for w in args[1]]
        args[2] = [b[2 * (KEY_DIM - kd):] for b in args[2]]
        args[3], args[4] = [w[:kd] for w in args[3]], [b[:kd] for b in args[4]]
        args[8] = kd
        assert len(args[1]) == heads
    assert message in _reasons(args)


def test_reasons_refuse_value_dim_other_than_channels_over_heads():
    """One head whose value dim differs from its input width: the reference allows it, the kernel does not."""
    x, _, _, dw_w, dw_b, biases, _, _, kd, window = folded_inputs((64, 1, (5,)), 7, 7, 7, torch.float32, "cpu", batch=1)
    qkv_w, qkv_b = [torch.randn(2 * kd + 32, 64, 1, 1)], [torch.randn(2 * kd + 32)]
    proj_w, proj_b = torch.randn(64, 32, 1, 1), torch.randn(64)
    refused = _reasons((x, qkv_w, qkv_b, dw_w, dw_b, biases, proj_w, proj_b, kd, window))
    assert "64 input channels ≠ heads·value dim = 1·32" in refused


def test_explicit_request_without_a_gpu_raises_and_auto_falls_back(pretend_measured):
    if torch.cuda.is_available():
        pytest.skip("checks the behaviour without a GPU")
    args = folded_inputs((64, 4, (5, 5, 5, 5)), 9, 11, 7, torch.float32, "cpu", batch=1)
    with torch.no_grad(), pytest.raises(dispatch.BackendUnavailable, match="backend 'cuda' was requested"):
        cascaded_group_attention(*args, backend="cuda")
    pretend_measured(OP, "cuda")  # even measured fastest, the cuda backend must be passed over here
    with torch.no_grad():
        assert dispatch.choose(CascadedGroupAttentionArgs(*args)).name == "torch"
        torch.testing.assert_close(cascaded_group_attention(*args),
                                   cascaded_group_attention_reference(CascadedGroupAttentionArgs(*args)))


def test_cuda_backend_is_registered_but_not_a_default():
    assert dispatch.get(OP, "cuda") is not None
    if not torch.cuda.is_available():
        assert dispatch.status(OP)["cuda"][-1].startswith("not measured faster than the reference for any shape")
