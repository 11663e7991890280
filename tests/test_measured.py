"""The automatic choice's table of measured backends: how a GPU pass's results become it."""

import json
from pathlib import Path

import pytest
import torch

from benchmarks import record_measured
from evit_kernels import measured


def _row(op, shape, **measured_ms):
    return {"op": op, "shape_class": shape, "measured": measured_ms}


def test_the_fastest_backend_that_matched_the_reference_is_recorded():
    rows = [
        _row("ffn", "A", torch={"ms": 2.0, "ok": True}, triton={"ms": 1.0, "ok": True}),
        _row("ffn", "B", torch={"ms": 2.0, "ok": True}, triton={"ms": 1.0, "ok": False}),  # fast but wrong
        _row("ffn", "C", torch={"ms": 1.0, "ok": True}, triton={"ms": 1.5, "ok": True}),
        _row("conv_bn_act", "A", torch={"ms": 1.0, "ok": True}, cuda={"reasons": ["no GPU"]}),
    ]
    assert record_measured.fastest_backends(rows) == {"ffn": {"A": "triton", "B": "torch", "C": "torch"},
                                                      "conv_bn_act": {"A": "torch"}}


@pytest.mark.parametrize("log, passed", [
    ("## tests/a.py\n120 passed in 50.1s\n## tests/a.py: exit 0\n" + record_measured.PASSED, True),
    ("## tests/a.py\n1 failed, 119 passed in 50.1s\n## tests/a.py: exit 1", False),
    ("## tests/a.py\nFatal Python error: Segmentation fault\n## tests/a.py: exit 139", False),
    ("", False),
])
def test_only_a_pass_whose_tests_passed_counts(log, passed):
    assert record_measured.tests_passed(f"{log}\n") is passed


def test_the_pass_writes_the_line_that_says_its_tests_passed():
    assert f'echo "{record_measured.PASSED}"' in Path(record_measured.__file__).with_name("gpu_pass.sh").read_text()


def test_a_pass_is_folded_into_the_table(tmp_path, monkeypatch, capsys):
    table = tmp_path / "measured_backends.json"
    table.write_text(json.dumps({"Other GPU": {"ops": {"ffn": {"A": "triton"}}}}))
    monkeypatch.setattr(measured, "TABLE", table)
    results = tmp_path / "20261202-0900"
    results.mkdir()
    (results / "correctness.log").write_text(f"...\n10 passed in 5.0s\n{record_measured.PASSED}\n")
    rows = [_row("ffn", "A", torch={"ms": 2.0, "ok": True}, triton={"ms": 1.0, "ok": True})]
    (results / "released_ops.json").write_text(json.dumps({"gpu": "NVIDIA H200", "commit": "abc", "rows": rows}))
    monkeypatch.setattr("sys.argv", ["record_measured", str(results)])
    assert record_measured.main() == 0
    written = json.loads(table.read_text())
    assert written["NVIDIA H200"] == {"commit": "abc", "results": "20261202-0900", "ops": {"ffn": {"A": "triton"}}}
    assert written["Other GPU"] == {"ops": {"ffn": {"A": "triton"}}}
    (results / "correctness.log").write_text("...\n1 failed, 9 passed in 5.0s\n")
    assert record_measured.main() == 1


def test_the_committed_table_names_only_known_ops_and_backends():
    from evit_kernels import dispatch

    for gpu, entry in measured.table().items():
        for op, shapes in entry["ops"].items():
            assert op in dispatch.ops(), (gpu, op)
            assert set(shapes.values()) <= set(dispatch.PREFERENCE), (gpu, op)


def test_the_pass_times_the_paths_the_triton_backend_chooses_between(monkeypatch):
    """The paths a GPU has to settle (benchmarks/released_ops.py, alternative_calls): where conv_block's Triton backend
    takes the spatial-conv-and-projection kernel, the layer-by-layer path is timed and checked too, outside the
    backends the table is made from; where it gathers on chip, the tile kernels."""
    from benchmarks import released_ops
    from evit_kernels.ops.conv_block import ConvBlockArgs
    from evit_kernels.ops.conv_bn_act import ConvBnActArgs
    from evit_kernels.triton import _common as triton_common
    from tests.test_conv_block import CASES, _inputs

    monkeypatch.setattr(triton_common, "SMS", 0)  # the tiny grid takes the kernel
    (x, w1, b1, w2, b2, w3, b3), kwargs = _inputs(CASES["mbconv_7x7_residual"], torch.float32)
    args = ConvBlockArgs(x, w1, b1, "hardswish", w2, b2, "hardswish", [1, 1], [1, 1], w2.shape[0], w3, b3, "none",
                         kwargs["residual"])
    result = released_ops.measure_call(args, "cpu")
    assert set(result["measured"]) == {"torch", "triton"} and result["measured"]["triton"]["ok"]
    assert set(result["alternatives"]) == {"triton layer by layer"}
    alternative = result["alternatives"]["triton layer by layer"]
    assert alternative["ok"] and alternative["ms"] > 0
    monkeypatch.setattr(triton_common, "SMS", 10**6)  # a grid the kernel does not take: nothing else to time
    assert released_ops.measure_call(args, "cpu")["alternatives"] == {}
    # a depthwise conv on a 7×7 NCHW map takes whole channel planes through on-chip gathers: the tile kernel too
    x = torch.randn(2, 32, 7, 7)
    depthwise = ConvBnActArgs(x, torch.randn(32, 1, 3, 3), torch.randn(32), [1, 1], [1, 1], [1, 1], 32, "hardswish",
                              None)
    alternatives = released_ops.measure_call(depthwise, "cpu")["alternatives"]
    assert set(alternatives) == {"triton without on-chip gathers"}
    assert alternatives["triton without on-chip gathers"]["ok"]
