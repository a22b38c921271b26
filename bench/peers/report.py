"""Markdown tables from bench.peers' JSON: `python -m bench.peers.report docs/bench/peers.json`."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def _beside(section: dict) -> str:
    """The limit as measured beside every level (a shorter run of the same, server idle)."""
    beside = [
        lv["limit_img_s"] for run in section["runs"] for lv in run["levels"] if "limit_img_s" in lv
    ]
    if not beside:
        return "."
    return (
        f"; measured again before and after every level: {np.median(beside):.2f} img/s "
        f"(range {min(beside):.2f}–{max(beside):.2f}). *Of the limit* sets each level "
        "against the mean of the two measurements beside it."
    )


def _of_limit(levels: list[dict], best: float) -> str:
    """Throughput / limit per run: the limit measured beside the level where there is one
    (older reports: the one limit measured at the start)."""
    return _spread([lv["throughput_rps"] / lv.get("limit_img_s", best) for lv in levels])


def markdown(report: dict) -> str:
    out = [
        f"Machine: {report['machine']}. Model {report['model']}. {report['date']}. "
        f"{report['duration_s']:.0f} s per level, {report['repeats']} runs per server "
        f"(order alternated), {report['threads']} intra-op threads everywhere.",
    ]
    for traffic, section in report["traffic"].items():
        limit = section["limit"]
        out += [
            "",
            f"### {traffic}",
            "",
            f"Bare `session.run` over the same images: **{limit['batch1_img_s']:.2f} img/s** at "
            f"batch 1, {limit['best_img_s']:.2f} at the best batch ({limit['best_batch']})"
            + _beside(section),
            "",
            "| server | protocol | conc | req/s (median, range) | of the limit (median, range) | p50 ms | p95 ms | p99 ms | mean batch | CPU ms/req |",
            "| --- | --- | --: | --: | --: | --: | --: | --: | --: | --: |",
        ]
        grouped: dict = defaultdict(list)
        for run in section["runs"]:
            for level in run["levels"]:
                grouped[(run["protocol"], run["server"], level["concurrency"])].append(level)
        best = max(limit["batch1_img_s"], limit["best_img_s"])
        for (protocol, server, conc), levels in sorted(grouped.items()):
            thr = [lv["throughput_rps"] for lv in levels]

            def med(key, levels=levels):
                vals = [lv[key] for lv in levels if lv.get(key) is not None]
                return f"{np.median(vals):.1f}" if vals else "-"

            batch = [lv["mean_batch"] for lv in levels if lv.get("mean_batch")]
            out.append(
                f"| {server} | {protocol} | {conc} | {_spread(thr)} | {_of_limit(levels, best)} | "
                f"{med('p50_ms')} | {med('p95_ms')} | {med('p99_ms')} | "
                f"{f'{np.median(batch):.2f}' if batch else '-'} | {med('server_cpu_ms_per_request')} |"
            )
        shapes = sorted(
            {s for run in section["runs"] for lv in run["levels"] for s in lv["p50_ms_by_size"]}
        )
        if len(shapes) > 1:
            out += [
                "",
                "p50 ms per shape (median of runs):",
                "",
                "| server | protocol | conc | " + " | ".join(shapes) + " |",
                "| --- | --- | --: |" + " --: |" * len(shapes),
            ]
            for (protocol, server, conc), levels in sorted(grouped.items()):
                cells = [
                    f"{np.median([lv['p50_ms_by_size'][s] for lv in levels if s in lv['p50_ms_by_size']]):.0f}"
                    for s in shapes
                ]
                out.append(f"| {server} | {protocol} | {conc} | " + " | ".join(cells) + " |")
        checks = {k: v for k, v in section.items() if k.startswith("labels_equal")}
        for k, v in checks.items():
            out.append(
                f"\nLabels identical on every shape ({k.removeprefix('labels_equal_')} vs segserve): **{v}**."
            )
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(markdown(json.loads(Path(sys.argv[1]).read_text())))
