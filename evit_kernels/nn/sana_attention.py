"""The drop-in processors of the Sana transformers' ReLU linear attention (diffusers ``SanaLinearAttnProcessor2_0``
of ``SanaTransformer2DModel``, ``SanaLinearAttnProcessor3_0`` of ``SanaVideoTransformer3DModel``): the attention
between the projections runs as ``evit::relu_linear_attention_tokens`` (docs/ops.md, "Token-major ReLU linear
attention").

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


def _projections(attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v (B, N, heads·d) as the original processors make them: the projections, then the optional q/k norms."""
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    query = attn.to_q(hidden_states)
    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value


def _output(attn: nn.Module, hidden_states: Tensor) -> Tensor:
    """The output projection and its dropout, as the original processors apply them."""
    return attn.to_out[1](attn.to_out[0](hidden_states))


class FusedSanaLinearAttnProcessor(FusedProcessor):
    """Drop-in for diffusers' ``SanaLinearAttnProcessor2_0`` (the self-attention of every ``SanaTransformer2DModel``
    block). Like the original it ignores ``attention_mask``, computes the attention in fp32, returns it in the
    hidden states' dtype and clips an fp16 output of ``to_out`` to ±65504."""

    MATCHES = (Match("diffusers", "SanaLinearAttnProcessor2_0", (DIFFUSERS_ATTENTION,)),)

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None) -> Tensor:
        original_dtype = hidden_states.dtype
        query, key, value = _projections(attn, hidden_states, encoder_hidden_states)
        out = relu_linear_attention_tokens(query, key, value, attn.heads, SANA_EPS, backend=self.backend)
        out = _output(attn, out.to(original_dtype))
        if original_dtype == torch.float16:
            out = out.clip(-65504, 65504)
        return out


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
