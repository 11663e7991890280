"""Summarise a pytest-benchmark JSON: median time, achieved GB/s against the minimum traffic, speedups.

    python benchmarks/summarize.py benchmarks/results/<run>/benchmarks.json [--markdown]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

BASELINES = ("eager", "timm")  # the first of these present in a group is the 1.0x reference


def rows(report: dict) -> list[dict]:
    groups = defaultdict(dict)
    for bench in report["benchmarks"]:
        info = bench["extra_info"]
        key = (info.get("op") or info.get("model"), info.get("layer", ""), info["batch"], info["dtype"])
        groups[key][info["variant"]] = (bench["stats"]["median"], info)
    out = []
    for (what, layer, batch, dtype), variants in sorted(groups.items(), key=str):
        base = next((variants[b][0] for b in BASELINES if b in variants), None)
        compiled = variants.get("compile", (None,))[0]
        for variant, (seconds, info) in variants.items():
            out.append({
                "what": what, "layer": layer, "batch": batch, "dtype": dtype, "variant": variant,
                "ms": seconds * 1e3,
                "GB/s": info["min_bytes"] / seconds / 1e9 if "min_bytes" in info else None,
                "images/s": info["images"] / seconds if "images" in info else None,
                "vs eager": base / seconds if base else None,
                "vs compile": compiled / seconds if compiled else None,
            })
    return out


def format_rows(table: list[dict], markdown: bool) -> str:
    columns = list(table[0]) if table else []
    cell = lambda v: "" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = [[c for c in columns]] + [[cell(r[c]) for c in columns] for r in table]
    if markdown:
        return "\n".join(["| " + " | ".join(lines[0]) + " |", "|" + "---|" * len(columns)]
                         + ["| " + " | ".join(line) + " |" for line in lines[1:]])
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json_path")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    with open(args.json_path) as f:
        print(format_rows(rows(json.load(f)), args.markdown))
