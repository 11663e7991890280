"""The runnable examples in python/ work end to end (tiny inputs)."""

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "python"

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("script, args, expect", [
    ("timm_inference.py", ["--model", "efficientvit_b0", "--batch", "1", "--res", "64"], "max |patched - eager|"),
    ("train_patched.py", ["--model", "efficientvit_m0", "--steps", "3", "--batch", "4", "--res", "64"], "step 2"),
    ("sam_encoder.py", ["--batch", "1", "--res", "128"], "image embeddings (1, 256, 64, 64)"),
    ("sana_lora.py", ["--steps", "3", "--batch", "1", "--res", "4"], "decoded (1, 3, 8, 8)"),
])
def test_example_runs(script, args, expect, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [script, *args])
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    out = capsys.readouterr().out
    assert "patch: swapped" in out and expect in out
    losses = [float(line.split("loss")[1]) for line in out.splitlines() if line.startswith("step ")]
    if losses:
        assert losses[-1] < losses[0], "training a patched model on a fixed batch must lower its loss"
