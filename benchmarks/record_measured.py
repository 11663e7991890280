"""Fold one GPU pass into the automatic choice's table (``evit_kernels/measured_backends.json``): for every op and
shape class its released_ops.json measured, the backend that was fastest among those that matched the reference.

Refused unless the pass's kernel tests all passed (its correctness.log). The GPU model's previous entry is replaced
whole.

    python -m benchmarks.record_measured benchmarks/results/<date>
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from evit_kernels import measured

PASSED = "every kernel test file passed"
"""The last line of a GPU pass's correctness.log when every file of kernel tests passed (benchmarks/gpu_pass.sh)."""


def fastest_backends(rows: list[dict]) -> dict[str, dict[str, str]]:
    """op -> shape class -> the fastest backend that matched the reference there (the reference always does)."""
    ops: dict[str, dict[str, str]] = {}
    for row in rows:
        passed = {name: m["ms"] for name, m in row["measured"].items() if m.get("ok")}
        if passed:
            ops.setdefault(row["op"], {})[row["shape_class"]] = min(passed, key=passed.get)
    return ops


def tests_passed(correctness_log: str) -> bool:
    """Whether the pass's correctness stage says every kernel test file passed (its log's last line)."""
    lines = correctness_log.strip().splitlines()
    return bool(lines) and lines[-1] == PASSED


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="a GPU pass's output folder")
    args = parser.parse_args()
    log = (args.results / "correctness.log").read_text() if (args.results / "correctness.log").exists() else ""
    if not tests_passed(log):
        print(f"{args.results}: the kernel tests did not all pass there; nothing recorded", file=sys.stderr)
        return 1
    run = json.loads((args.results / "released_ops.json").read_text())
    table = json.loads(measured.TABLE.read_text())
    table[run["gpu"]] = {"commit": run["commit"], "results": args.results.name, "ops": fastest_backends(run["rows"])}
    measured.TABLE.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    chosen = sum(1 for op in table[run["gpu"]]["ops"].values() for b in op.values() if b != "torch")
    print(f"{run['gpu']}: a kernel is the automatic choice for {chosen} shape classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
