"""patch() on diffusers' Sana transformers (image and video): every ReLU linear-attention processor swapped (the PAG
pipeline's included), the same outputs (eval) and gradients (train) as the untouched model, LoRA adapters added
before or after patching training the same, exact unpatch, set_attn_processor after patch, and one graph under
torch.compile."""

from __future__ import annotations

import copy

import pytest
import torch

import evit_kernels
from evit_kernels.nn._base import FusedProcessor
from tests.models import assert_same_gradients, rel_err
from tests.numerics import max_err

pytest.importorskip("diffusers")

from tests.diffusers_models import (  # noqa: E402
    sana_transformer,
    sana_transformer_inputs,
    sana_video_inputs,
    sana_video_transformer,
)

LINEAR_PROCESSORS = ("SanaLinearAttnProcessor2_0", "SanaLinearAttnProcessor3_0")
MODELS = {
    "image": (sana_transformer, sana_transformer_inputs),
    "image-qk-norm": (lambda: sana_transformer("rms_norm_across_heads"), sana_transformer_inputs),
    "video": (sana_video_transformer, sana_video_inputs),
}
OP = "relu_linear_attention_tokens"


def _linear_processors(model) -> int:
    return sum(type(p).__name__ in LINEAR_PROCESSORS for p in model.attn_processors.values())


def _patched(model, backend="auto"):
    patched = copy.deepcopy(model)
    report = evit_kernels.patch(patched, backend=backend)
    return patched, report


def _swapped_processors(report) -> int:
    return sum(path.endswith(".processor") for path, _, _ in report.swapped)


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("name", list(MODELS))
def test_eval_matches_and_every_linear_attention_processor_is_swapped(name, backend, op_runs):
    build, inputs = MODELS[name]
    model = build()
    patched, report = _patched(model, backend)
    assert _linear_processors(model) == len(model.transformer_blocks) == _swapped_processors(report), str(report)
    assert _linear_processors(patched) == 0
    assert all(path.endswith("attn1.processor") for path, _, _ in report.swapped if path.endswith(".processor"))
    rms_norms = sum(type(m).__name__ == "RMSNorm" for m in model.modules())
    assert rms_norms > 0 and sum(type(m).__name__ == "RMSNorm" for m in patched.modules()) == 0
    # every image block's feed-forward (the video model's GLUMBTempConv is another module)
    feed_forwards = 0 if name == "video" else len(model.transformer_blocks)
    assert sum(type(m).__name__ == "GLUMBConv" for m in model.modules()) == feed_forwards
    assert sum(type(m).__name__ == "FusedGLUMBConv" for m in patched.modules()) == feed_forwards
    x = inputs()
    with torch.no_grad():
        expected, got = model(**x).sample, patched(**x).sample
    assert torch.isfinite(got).all() and rel_err(got, expected) < 1e-4
    ran = "torch" if backend == "auto" else "triton"
    assert [run for run in op_runs if run[0] == OP] == [(OP, ran)] * len(model.transformer_blocks)
    others = {run for run in op_runs if run[0] != OP}
    assert others == {("rms_norm", ran)} | ({("conv_block", ran)} if feed_forwards else set())  # norms, GLUMBConvs
    assert sum(run[0] == "conv_block" for run in op_runs) == feed_forwards


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("name", ["image-qk-norm", "video"])
def test_train_loss_and_every_gradient_match(name, backend):
    build, inputs = MODELS[name]
    model = build().train()
    patched, _ = _patched(model, backend)
    x = inputs()
    weight = torch.randn_like(model(**x).sample)
    model.zero_grad()
    losses = []
    for m in (model, patched):
        loss = (m(**x).sample * weight).sum()
        loss.backward()
        losses.append(loss.detach())
    assert rel_err(losses[1], losses[0]) < 1e-4
    assert_same_gradients({n: p.grad for n, p in patched.named_parameters() if p.grad is not None},
                          {n: p.grad for n, p in model.named_parameters() if p.grad is not None})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("name", ["image", "video"])
def test_low_precision_is_finite_and_within_twice_eager_error(name, backend, dtype):
    """Against the fp32 model (diffusers rounds float64 to float32 in its processors, so fp32 is its most exact
    form): the patched model's error at most twice eager's own in the same dtype, plus one ulp of the output."""
    build, inputs = MODELS[name]
    model = build()
    patched, _ = _patched(model, backend)
    x = inputs()
    with torch.no_grad():
        expected = model(**x).sample
        eager = model.to(dtype)(**{k: v.to(dtype) for k, v in x.items()}).sample
        got = patched.to(dtype)(**{k: v.to(dtype) for k, v in x.items()}).sample
    assert got.dtype == dtype and torch.isfinite(got).all()
    floor = torch.finfo(dtype).eps * expected.abs().max().item()
    assert max_err(got, expected) <= 2 * max_err(eager, expected) + floor


def _add_lora(model, seed: int = 1) -> None:
    from peft import LoraConfig

    torch.manual_seed(seed)  # the same adapter weights in every model (B random, so the adapter is not a no-op)
    model.add_adapter(LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]))


def _train_lora(model, x, steps: int = 2) -> list[float]:
    params = [p for n, p in model.named_parameters() if "lora" in n]
    assert params
    optimizer = torch.optim.SGD(params, lr=0.5)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(**x).sample.square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("when, backend", [("before", "auto"), ("after", "auto"), ("after", "triton")])
def test_lora_added_before_or_after_patch_trains_the_same(when, backend):
    pytest.importorskip("peft")
    base = sana_transformer("rms_norm_across_heads").train()
    reference = copy.deepcopy(base)
    _add_lora(reference)
    model = copy.deepcopy(base)
    if when == "before":
        _add_lora(model)
    report = evit_kernels.patch(model, backend=backend)
    assert _swapped_processors(report) == len(base.transformer_blocks)
    if when == "after":
        _add_lora(model)
    assert type(model.transformer_blocks[0].attn1.to_q).__module__.startswith("peft.")
    x = sana_transformer_inputs()
    expected, got = _train_lora(reference, x), _train_lora(model, x)
    assert got[1] < got[0] and rel_err(torch.tensor(got), torch.tensor(expected)) < 1e-4
    lora = {n: p for n, p in reference.named_parameters() if "lora" in n}
    for n, p in model.named_parameters():
        if "lora" in n:
            assert rel_err(p, lora[n]) < 1e-5, n


def test_state_dict_unpatch_idempotence_and_set_attn_processor():
    from diffusers.models.attention_processor import SanaLinearAttnProcessor2_0

    model = sana_transformer()
    originals = dict(model.attn_processors)
    sd = model.state_dict()
    x = sana_transformer_inputs()
    with torch.no_grad():
        expected = model(**x).sample
    report = evit_kernels.patch(model)
    assert list(model.state_dict()) == list(sd)
    assert not evit_kernels.patch(model).swapped, "patching twice must change nothing"
    patched_processors = model.attn_processors
    assert all(isinstance(p, FusedProcessor) == (type(originals[n]).__name__ in LINEAR_PROCESSORS)
               for n, p in patched_processors.items())

    # set_attn_processor still sees every attention layer and replaces the fused processors
    fresh = {n: SanaLinearAttnProcessor2_0() if isinstance(p, FusedProcessor) else p
             for n, p in patched_processors.items()}
    model.set_attn_processor(fresh)
    assert not any(isinstance(p, FusedProcessor) for p in model.attn_processors.values())
    with torch.no_grad():
        assert rel_err(model(**x).sample, expected) < 1e-6
    assert len(evit_kernels.patch(model).swapped) == _swapped_processors(report)

    model.set_attn_processor(dict(originals))  # (it empties the dict it is given)
    evit_kernels.patch(model)
    assert evit_kernels.unpatch(model) == len(report.swapped)
    assert all(p is originals[n] for n, p in model.attn_processors.items())


PAG_PROCESSORS = {True: "PAGCFGSanaLinearAttnProcessor2_0", False: "PAGIdentitySanaLinearAttnProcessor2_0"}
"""The processor SanaPAGPipeline sets on its guided layers, with and without classifier-free guidance."""


def _pag_transformer(guidance: bool, layers: str | list[str], qk_norm: str | None = None):
    """A small Sana transformer whose processors SanaPAGPipeline itself has set for a call with or without
    classifier-free guidance: the PAG processor (one object) on the self-attention of every block ``layers`` names,
    ``SanaLinearAttnProcessor2_0`` on the others."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPAGPipeline

    pipe = SanaPAGPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=sana_transformer(qk_norm),
                           scheduler=FlowMatchEulerDiscreteScheduler(), pag_applied_layers=layers)
    pipe._set_pag_attn_processor(pipe.pag_applied_layers, do_classifier_free_guidance=guidance)
    return pipe.transformer


@pytest.mark.parametrize("qk_norm, backend", [(None, "auto"), ("rms_norm_across_heads", "auto"),
                                             ("rms_norm_across_heads", "triton")])
@pytest.mark.parametrize("guidance", [True, False], ids=["cfg", "identity"])
def test_pag_processors_are_swapped_and_match(guidance, qk_norm, backend, op_runs):
    """Block 1 guided, block 0 not: the batch is (unconditional, conditional, perturbed) with guidance, (conditional,
    perturbed) without, two latents a chunk. With q/k norms in the model, the PAG originals skip them: so must the
    fused ones. The kernels (through the interpreter: slow) run with q/k norms only, where both blocks' attentions
    read q and k from different tensors (block 0 from the norms', block 1 from the projections' chunks)."""
    model = _pag_transformer(guidance, ["transformer_blocks.1"], qk_norm)
    assert type(model.transformer_blocks[1].attn1.processor).__name__ == PAG_PROCESSORS[guidance]
    patched, report = _patched(model, backend)
    assert _swapped_processors(report) == 2 and _linear_processors(patched) == 0, str(report)
    assert f"{PAG_PROCESSORS[guidance]} -> FusedPAG" in str(report)
    chunks = 3 if guidance else 2
    x = sana_transformer_inputs(batch=2 * chunks)
    with torch.no_grad():
        expected, got = model(**x).sample, patched(**x).sample
    assert torch.isfinite(got).all() and rel_err(got, expected) < 1e-4
    # block 0 attends over the whole batch, block 1 over every chunk but the perturbed one
    ran = "torch" if backend == "auto" else "triton"
    assert [run for run in op_runs if run[0] == OP] == [(OP, ran)] * 2
    query = patched.transformer_blocks[1].attn1.to_q
    seen = []
    handle = query.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[0]))
    with torch.no_grad():
        patched(**x)
    handle.remove()
    assert seen == [2 * (chunks - 1)]


@pytest.mark.parametrize("guidance", [True, False], ids=["cfg", "identity"])
def test_pag_processors_unpatch_exactly_and_refuse_a_batch_the_original_refuses(guidance):
    model = _pag_transformer(guidance, "transformer_blocks")  # every block's self-attention: one shared object
    shared = model.transformer_blocks[0].attn1.processor
    assert all(block.attn1.processor is shared for block in model.transformer_blocks)
    x = sana_transformer_inputs(batch=3 if guidance else 2)
    with torch.no_grad():
        expected = model(**x).sample
    report = evit_kernels.patch(model)
    assert _swapped_processors(report) == len(model.transformer_blocks)
    assert not any(block.attn1.processor is shared for block in model.transformer_blocks)
    attn = model.transformer_blocks[0].attn1
    hidden = torch.randn(1, 30, attn.inner_dim)  # one latent: fewer chunks than the processor splits the batch into
    with pytest.raises(ValueError):
        shared(attn, hidden)
    with pytest.raises(ValueError, match="chunks"):
        attn.processor(attn, hidden)
    assert evit_kernels.unpatch(model) == len(report.swapped)
    assert all(block.attn1.processor is shared for block in model.transformer_blocks)
    with torch.no_grad():
        assert torch.equal(model(**x).sample, expected)


def test_video_transformer_at_its_released_head_dim_runs_the_kernels(op_runs):
    """Sana-Video's d = 112 (one head, one block): the attention on the wide-head kernels, forward and backward, the
    loss and every gradient as the original's."""
    model = sana_video_transformer(heads=1, head_dim=112, layers=1).train()
    patched, _ = _patched(model, f"{OP}=triton")
    x = sana_video_inputs()
    weight = torch.randn_like(model(**x).sample)
    model.zero_grad()
    op_runs.clear()
    losses = [(m(**x).sample * weight).sum() for m in (model, patched)]
    for loss in losses:
        loss.backward()
    assert [run for run in op_runs if run[0] == OP] == [(OP, "triton")]
    assert rel_err(losses[1].detach(), losses[0].detach()) < 1e-4
    assert_same_gradients({n: p.grad for n, p in patched.named_parameters() if p.grad is not None},
                          {n: p.grad for n, p in model.named_parameters() if p.grad is not None})


def test_video_processor_needs_rotary_emb_as_the_original():
    model = sana_video_transformer()
    evit_kernels.patch(model)
    attn = model.transformer_blocks[0].attn1
    with pytest.raises(ValueError, match="rotary_emb"):
        attn.processor(attn, torch.randn(1, 4, 16))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["auto", f"{OP}=triton"])
@pytest.mark.parametrize("name", ["image-qk-norm", "video"])
def test_compiled_patched_transformer_block_is_one_graph(name, backend):
    """A patched block under torch.compile(fullgraph=True): one graph, same numbers; with the attention on the
    Triton kernels it is one node of that graph ("auto" runs the reference as plain ops, traced through)."""
    torch._dynamo.reset()
    build, inputs = MODELS[name]
    model = build()
    block = model.transformer_blocks[0]
    captured = {}
    handle = block.register_forward_pre_hook(lambda m, args, kwargs: captured.setdefault("in", (args, kwargs)),
                                             with_kwargs=True)
    with torch.no_grad():
        model(**inputs())
    handle.remove()
    args, kwargs = captured["in"]
    patched = copy.deepcopy(block)
    evit_kernels.patch(patched, backend=backend)
    nodes = []

    def compiler(gm, example_inputs):
        nodes.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    compiled = torch.compile(patched, backend=compiler, fullgraph=True)
    with torch.no_grad():
        assert rel_err(compiled(*args, **kwargs), block(*args, **kwargs)) < 1e-4
    assert nodes.count(f"evit.{OP}") == (0 if backend == "auto" else 1), nodes


def test_patch_on_a_pipelines_transformer_and_vae():
    """SanaPipeline (no text encoder: the prompt embeddings are given) patched through pipe.transformer and pipe.vae
    gives the same latents and images."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline

    from tests.diffusers_models import autoencoder_dc

    pipe = SanaPipeline(tokenizer=None, text_encoder=None, vae=autoencoder_dc(), transformer=sana_transformer(),
                        scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    embeds = {"prompt_embeds": torch.randn(1, 3, 8), "prompt_attention_mask": torch.ones(1, 3),
              "negative_prompt_embeds": torch.randn(1, 3, 8), "negative_prompt_attention_mask": torch.ones(1, 3)}

    def run(output_type):
        return pipe(**embeds, negative_prompt=None, num_inference_steps=2, height=32, width=32, output_type=output_type,
                    use_resolution_binning=False, generator=torch.Generator().manual_seed(0)).images

    expected = {kind: run(kind) for kind in ("latent", "pt")}
    assert evit_kernels.patch(pipe.transformer).swapped and evit_kernels.patch(pipe.vae).swapped
    for kind, image in expected.items():
        assert rel_err(run(kind), image) < 1e-4, kind
