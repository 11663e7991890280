"""The drop-in processors of the Sana transformers' ReLU linear attention (diffusers ``SanaLinearAttnProcessor2_0``
of ``SanaTransformer2DModel``, ``SanaLinearAttnProcessor3_0`` of ``SanaVideoTransformer3DModel``, and the two
processors the Sana PAG pipeline sets on its guided layers, ``PAGCFGSanaLinearAttnProcessor2_0`` and
``PAGIdentitySanaLinearAttnProcessor2_0``): the attention between the projections runs as
``evit::relu_linear_attention_tokens`` (docs/ops.md, "Token-major ReLU linear attention").

Each calls ``attn.to_q``, ``attn.to_k``, ``attn.to_v``, ``attn.norm_q``, ``attn.norm_k`` and ``attn.to_out`` exactly
as the original does, so adapters on those layers (PEFT / LoRA, added before or after patching) keep working; only
the transposes, the ones-padded value, the fp32 copies and the two matmuls in between are replaced.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from evit_kernels.nn._base import FusedProcessor
from evit_kernels.nn._match import DIFFUSERS_ATTENTION, DIFFUSERS_SANA_VIDEO, Match
from evit_kernels.ops.relu_linear_attention import relu_linear_attention_tokens

SANA_EPS = 1e-15
"""The denominator's epsilon, written into both of diffusers' Sana linear-attention processors."""


def _projections(attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None, qk_norms: bool = True
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v (B, N, heads·d) as the original processors make them: the projections, then the optional q/k norms
    (which the PAG processors never apply: ``qk_norms=False``)."""
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    query = attn.to_q(hidden_states)
    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)
    if qk_norms and attn.norm_q is not None:
        query = attn.norm_q(query)
    if qk_norms and attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value


def _output(attn: nn.Module, hidden_states: Tensor) -> Tensor:
    """The output projection and its dropout, as the original processors apply them."""
    return attn.to_out[1](attn.to_out[0](hidden_states))


def _clipped(out: Tensor) -> Tensor:
    """The output as the image processors return it: fp16 clipped to ±65504, other dtypes untouched."""
    return out.clip(-65504, 65504) if out.dtype == torch.float16 else out


class FusedSanaLinearAttnProcessor(FusedProcessor):
    """Drop-in for diffusers' ``SanaLinearAttnProcessor2_0`` (the self-attention of every ``SanaTransformer2DModel``
    block). Like the original it ignores ``attention_mask``, computes the attention in fp32, returns it in the
    hidden states' dtype and clips an fp16 output of ``to_out`` to ±65504."""

    MATCHES = (Match("diffusers", "SanaLinearAttnProcessor2_0", (DIFFUSERS_ATTENTION,)),)

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None) -> Tensor:
        return _clipped(self.attend(attn, hidden_states, encoder_hidden_states))

    def attend(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
               qk_norms: bool = True) -> Tensor:
        """The linear attention of ``hidden_states`` through ``attn``'s layers, up to ``to_out`` included, in the
        hidden states' dtype (not clipped)."""
        query, key, value = _projections(attn, hidden_states, encoder_hidden_states, qk_norms)
        out = relu_linear_attention_tokens(query, key, value, attn.heads, SANA_EPS, backend=self.backend)
        return _output(attn, out.to(hidden_states.dtype))


class _FusedSanaPAGProcessor(FusedSanaLinearAttnProcessor):
    """The Sana PAG processors: the batch is ``GUIDED + 1`` equal chunks; the first ``GUIDED`` get the linear
    attention (self-attention only, without the q/k norms, as the originals), the last, perturbed one gets the
    identity attention: its value projection passed straight to ``to_out``. The two are concatenated in that
    order, and an fp16 result clipped, as the originals do."""

    GUIDED: int

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None) -> Tensor:
        chunks = hidden_states.chunk(self.GUIDED + 1)
        if len(chunks) != self.GUIDED + 1:  # where the original fails to unpack its chunks
            raise ValueError(f"{type(self.original).__name__} splits the batch into {self.GUIDED + 1} chunks, "
                             f"a batch of {hidden_states.shape[0]} gives {len(chunks)}")
        perturbed = chunks[-1]
        guided = hidden_states[:hidden_states.shape[0] - perturbed.shape[0]]  # the first GUIDED chunks, as one view
        identity = _output(attn, attn.to_v(perturbed).to(hidden_states.dtype))
        return _clipped(torch.cat([self.attend(attn, guided, qk_norms=False), identity]))


class FusedPAGCFGSanaLinearAttnProcessor(_FusedSanaPAGProcessor):
    """Drop-in for diffusers' ``PAGCFGSanaLinearAttnProcessor2_0`` (PAG with classifier-free guidance: the batch is
    unconditional, conditional, perturbed)."""

    MATCHES = (Match("diffusers", "PAGCFGSanaLinearAttnProcessor2_0", (DIFFUSERS_ATTENTION,)),)
    GUIDED = 2


class FusedPAGIdentitySanaLinearAttnProcessor(_FusedSanaPAGProcessor):
    """Drop-in for diffusers' ``PAGIdentitySanaLinearAttnProcessor2_0`` (PAG without classifier-free guidance: the
    batch is conditional, perturbed)."""

    MATCHES = (Match("diffusers", "PAGIdentitySanaLinearAttnProcessor2_0", (DIFFUSERS_ATTENTION,)),)
    GUIDED = 1


class FusedSanaVideoLinearAttnProcessor(FusedProcessor):
    """Drop-in for diffusers' ``SanaLinearAttnProcessor3_0`` (the self-attention of ``SanaVideoTransformer3DModel``):
    the rotary embedding ``rotary_emb`` (cos, sin) is applied, as the original applies it, to the ReLU'd q and k of
    the numerator; the denominator takes the unrotated ones. ``attention_mask`` is ignored, as by the original."""

    MATCHES = (Match("diffusers", "SanaLinearAttnProcessor3_0", (DIFFUSERS_SANA_VIDEO,)),)

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, rotary_emb: tuple[Tensor, Tensor] | None = None) -> Tensor:
        if rotary_emb is None:
            raise ValueError("SanaLinearAttnProcessor3_0 needs rotary_emb (cos, sin): the original fails without it")
        original_dtype = hidden_states.dtype
        query, key, value = _projections(attn, hidden_states, encoder_hidden_states)
        rotated_q, rotated_k = (_rotate(torch.relu(t).unflatten(2, (attn.heads, -1)), *rotary_emb).flatten(2)
                                for t in (query, key))
        out = relu_linear_attention_tokens(query, key, value, attn.heads, SANA_EPS, rotated_q, rotated_k,
                                           backend=self.backend)
        return _output(attn, out.to(original_dtype))


def _rotate(x: Tensor, freqs_cos: Tensor, freqs_sin: Tensor) -> Tensor:
    """``SanaLinearAttnProcessor3_0``'s rotary embedding of ``x`` (B, N, heads, d): each pair (2i, 2i+1) rotated
    by the angle whose cos is ``freqs_cos[..., 2i]`` and sin ``freqs_sin[..., 2i+1]``, in ``x``'s dtype."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)
