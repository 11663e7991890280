"""The evit ops (``torch.ops.evit.*``): one file per op with its reference, registration and dispatch.

Importing this package registers every op with ``torch.library`` and with :mod:`evit_kernels.dispatch`.
"""

from evit_kernels.ops.cascaded_group_attention import cascaded_group_attention
from evit_kernels.ops.conv_block import conv_block
from evit_kernels.ops.conv_bn_act import conv_bn_act
from evit_kernels.ops.ffn import ffn
from evit_kernels.ops.multiscale_aggregation import multiscale_aggregation
from evit_kernels.ops.relu_linear_attention import relu_linear_attention, relu_linear_attention_tokens
from evit_kernels.ops.rms_norm import rms_norm

__all__ = ["cascaded_group_attention", "conv_block", "conv_bn_act", "ffn", "multiscale_aggregation",
           "relu_linear_attention", "relu_linear_attention_tokens", "rms_norm"]
