"""`evit_kernels.info()` and `python -m evit_kernels info`."""

import json
import subprocess
import sys

import torch

import evit_kernels
from evit_kernels import dispatch
from evit_kernels.info import format_info

EXPECTED_OPS = {"relu_linear_attention", "relu_linear_attention_aggregated", "relu_linear_attention_tokens",
                "multiscale_aggregation", "cascaded_group_attention", "window_attention", "conv_bn_act", "conv_block",
                "ffn", "rms_norm"}
CUDA_OPS = {"cascaded_group_attention", "conv_bn_act"}  # the ops with a kernel in csrc/


def test_info_reports_versions_and_every_op():
    report = evit_kernels.info()
    assert report["torch"] == torch.__version__
    assert report["cuda"] == torch.version.cuda
    assert set(report["ops"]) == EXPECTED_OPS
    for op, backends in report["ops"].items():
        assert list(backends) == list(dispatch.PREFERENCE), op
        assert backends["torch"] == [], f"the reference backend of {op} must always be usable"


def test_info_explains_every_unusable_backend():
    report = evit_kernels.info()
    for backends in report["ops"].values():
        for name, reasons in backends.items():
            assert all(isinstance(r, str) and r for r in reasons), name
    if not torch.cuda.is_available():
        assert report["gpu"] is None
        for op, backends in report["ops"].items():
            if op in CUDA_OPS:
                assert "no CUDA GPU is visible to torch" in backends["cuda"], op
            else:
                assert backends["cuda"] == [f"no cuda implementation of {op} yet"], op
    text = format_info(report)
    for op in EXPECTED_OPS:
        assert op in text
    assert ("built for sm" in text) == report["extension"]["built"]


def test_cli_info_prints_text_and_json():
    text = subprocess.run([sys.executable, "-m", "evit_kernels", "info"], capture_output=True, text=True, check=True)
    assert "backends per op" in text.stdout
    assert text.stdout.count("    torch  usable") == len(EXPECTED_OPS)  # the reference runs every op
    raw = subprocess.run([sys.executable, "-m", "evit_kernels", "info", "--json"], capture_output=True, text=True,
                         check=True)
    assert set(json.loads(raw.stdout)["ops"]) == EXPECTED_OPS
