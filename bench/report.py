"""Markdown tables from bench/compare.py's compare.json, for docs/benchmarks.md.

python -m bench.report docs/bench/compare.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def http_rows(runs: list[dict], stages: bool = True) -> list[str]:
    rows = []
    for r in runs:
        cells = [
            str(r["concurrency"]),
            f"{r['throughput_rps']:.2f}",
            f"{r['p50_ms']:.1f}",
            f"{r['p95_ms']:.1f}",
            f"{r['p99_ms']:.1f}",
        ]
        if stages:
            batch = f"{r['server_mean_batch']:.2f}" if r["server_mean_batch"] else "-"
            cells += [batch, ", ".join(f"{k} {v:.1f}" for k, v in r["server_stage_ms"].items())]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def render(report: dict) -> str:
    out = [
        f"Machine: {report['machine']}. Date: {report['date']}. Model {report['model']}, {report['size']} JPEGs.",
        "",
    ]
    out += ["| batch | ms per run | images/s |", "| --: | --: | --: |"]
    out += [
        f"| {n} | {v['ms_per_run']:.1f} | {v['images_per_s']:.2f} |"
        for n, v in report["bare"]["by_batch"].items()
    ]
    out += ["", "| image | ms | megapixels/s |", "| --: | --: | --: |"]
    out += [
        f"| {k} | {v['ms_per_image']:.1f} | {v['megapixels_per_s']:.2f} |"
        for k, v in report["bare_by_size"].items()
    ]
    out += [
        "",
        "| concurrency | req/s | p50 ms | p95 ms | p99 ms | mean batch | server stages, mean ms |",
        "| --: | --: | --: | --: | --: | --: | --- |",
    ]
    out += http_rows(report["segserve"]) + [
        row.replace("| 16 |", "| 16, batching off |", 1)
        for row in http_rows(report["segserve_batching_off"])
    ]
    out += [
        "",
        "| concurrency | req/s | p50 ms | p95 ms | p99 ms |",
        "| --: | --: | --: | --: | --: |",
    ]
    out += http_rows(report["naive"], stages=False)
    ratios = report["ratios"]
    out += [
        "",
        "| ratio | value |",
        "| --- | --: |",
        f"| segserve best throughput / bare onnxruntime best | {ratios['segserve_over_bare_throughput']:.2f} |",
        f"| segserve p50 at concurrency 1 − bare session.run, ms | {ratios['segserve_p50_c1_ms']:.1f} − {ratios['bare_batch1_ms']:.1f} = {ratios['segserve_p50_c1_minus_bare_ms']:.1f} |",
        f"| segserve best throughput / naive best | {ratios['segserve_over_naive_throughput']:.2f} |",
    ]
    rss, naive = report["segserve_rss_mb"], report["naive_rss_mb"]
    out += [
        "",
        "| server | RSS after start-up, MB | peak RSS under load, MB |",
        "| --- | --: | --: |",
        f"| segserve | {rss['after_load_idle']:.0f} | {rss['peak_under_load']:.0f} |",
        f"| naive PyTorch | {naive['after_load_idle']:.0f} | {naive['peak_under_load']:.0f} |",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    print(
        render(
            json.loads(
                Path(sys.argv[1] if len(sys.argv) > 1 else "docs/bench/compare.json").read_text()
            )
        )
    )
