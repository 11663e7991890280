"""How the kernels read PyTorch's TF32 settings (evit_kernels/fp32_precision.py): through either of PyTorch's two
APIs, and without raising where a program mixes them, which makes PyTorch's own legacy getters raise. Each case runs
in a fresh interpreter: a setting once made through the new API cannot be undone in-process to the initial state."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(not hasattr(torch.backends.cudnn.conv, "fp32_precision"),
                                reason="the fp32_precision API is torch 2.9's")

# (a program's settings, TF32 for convolutions, TF32 for matmuls), as PyTorch's notes on TF32 describe them.
CASES = [
    ("", True, False),  # PyTorch's defaults
    ("torch.set_float32_matmul_precision('high')", True, True),
    ("torch.backends.cuda.matmul.allow_tf32 = True", True, True),
    ("torch.backends.cudnn.allow_tf32 = False", False, False),
    ("torch.backends.cuda.matmul.fp32_precision = 'tf32'", True, True),  # the legacy matmul getter raises
    ("torch.backends.cudnn.conv.fp32_precision = 'ieee'", False, False),  # the legacy cuDNN getter raises
    ("torch.backends.fp32_precision = 'tf32'", True, True),  # the global setting, for both
    ("torch.backends.cudnn.rnn.fp32_precision = 'ieee'", True, False),  # the legacy cuDNN getter raises
    ("torch.backends.cuda.matmul.fp32_precision = 'tf32'; torch.backends.cudnn.conv.fp32_precision = 'ieee'",
     False, True),
]


@pytest.mark.parametrize("settings, conv, matmul", CASES, ids=[c[0] or "defaults" for c in CASES])
def test_tf32_allowed_reads_either_api(settings, conv, matmul):
    script = textwrap.dedent(f"""
        import torch
        from evit_kernels.fp32_precision import tf32_allowed
        {settings}
        print(tf32_allowed("conv"), tf32_allowed("matmul"))
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == [str(conv), str(matmul)]


def test_tf32_allowed_names_the_ops_it_knows():
    from evit_kernels.fp32_precision import tf32_allowed

    with pytest.raises(ValueError, match="conv"):
        tf32_allowed("linear")
