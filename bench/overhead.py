"""The service's own cost, apart from any model: a near-zero-cost ONNX model with the served
I/O contract (a channel argmax of the input), served by segserve, measured against that
model's bare `session.run`, in one run.

    python -m bench.overhead --duration 10 [--baseline-tree /tmp/segserve-old [--rounds 4]]
                             [--out docs/bench]

`--baseline-tree` serves the same measurement from another checkout of segserve (for
before/after: `git worktree add /tmp/segserve-old <commit>`), its own code even beside this
checkout's editable install; trees from before the uint8 contract get the float-input variant
of the null model. Extra server environment for both (e.g. OTEL_*) passes through.

Per server and concurrency: throughput, p50/p99, and server CPU per request (the server
process's user+system CPU time from /proc, onnxruntime's threads included, over requests).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import tomllib
from onnx import TensorProto, helper

from segserve import loadgen
from segserve.contracts.card import ModelCard
from segserve.contracts.palette import voc_palette
from segserve.contracts.repository import CARD_FILE, MODEL_FILE

ROOT = Path(__file__).resolve().parent.parent


def null_model(folder: Path, uint8: bool) -> Path:
    """REPO/null/1/model.onnx, a model that costs (almost) nothing. uint8: image uint8
    [N,H,W,3] -> labels uint8 [N,H,W] = the red channel's top two bits (4 classes; Split,
    Squeeze, BitShift: 0.34 ms CPU at 512x512, where ArgMax over the channels took 1.05 ms;
    piecewise-constant labels like a real segmentation's, so the PNG costs what a real one
    does). Else (trees before the uint8 contract): float [N,3,H,W] -> logits = the input
    (3 classes, the argmax of the channels on the host)."""
    T = TensorProto
    if uint8:
        image = helper.make_tensor_value_info("image", T.UINT8, ["N", "H", "W", 3])
        out = helper.make_tensor_value_info("labels", T.UINT8, ["N", "H", "W"])
        nodes = [
            helper.make_node("Split", ["image"], ["r", "g", "b"], axis=3, num_outputs=3),
            helper.make_node("Squeeze", ["r", "axis"], ["red"]),
            helper.make_node("BitShift", ["red", "six"], ["labels"], direction="RIGHT"),
        ]
        inits = [
            helper.make_tensor("axis", T.INT64, [1], [3]),
            helper.make_tensor("six", T.UINT8, [], [6]),
        ]
        classes = 4
    else:
        image = helper.make_tensor_value_info("image", T.FLOAT, ["N", 3, "H", "W"])
        out = helper.make_tensor_value_info("logits", T.FLOAT, ["N", 3, "H", "W"])
        nodes, inits, classes = [helper.make_node("Identity", ["image"], ["logits"])], [], 3
    graph = helper.make_graph(nodes, "null", [image], [out], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    card = ModelCard(
        name="null",
        architecture="null",
        num_classes=classes,
        class_names=[f"c{i}" for i in range(classes)],
        palette=voc_palette(classes),
        mean=[0.5] * 3,
        std=[0.25] * 3,
        output="labels" if uint8 else "logits",
        size_divisor=1,
        input_dtype="uint8" if uint8 else "float32",
        input_layout="NHWC" if uint8 else "NCHW",
        producer="bench.overhead",
    )
    props = card.to_metadata()
    if not uint8:  # what trees from before the uint8 contract read
        props["input_layout"] = "NCHW float32"
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)
    target = folder / "null" / "1"
    target.mkdir(parents=True)
    onnx.save(model, str(target / MODEL_FILE))
    (target / CARD_FILE).write_text(card.to_json())
    return target / MODEL_FILE


def bare_ms(model: Path, image: bytes, uint8: bool, seconds: float = 3.0) -> float:
    """p50 ms of the bare session.run on one decoded image, as the served graph takes it."""
    import onnxruntime as ort

    from segserve.service.media.imaging import decode_image

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    rgb = decode_image(image, 10**9)
    feed = rgb[None] if uint8 else rgb.transpose(2, 0, 1)[None].astype(np.float32)
    times, stop = [], time.perf_counter() + seconds
    while time.perf_counter() < stop:
        t0 = time.perf_counter()
        session.run(None, {"image": feed})
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000)


def without_fast_http(folder: Path) -> Path:
    """A folder that, first on PYTHONPATH, makes `import httptools` and `import uvloop` fail:
    uvicorn then runs as it did before the project installed them (h11, asyncio)."""
    for name in ("httptools", "uvloop"):
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "__init__.py").write_text(
            "raise ImportError('hidden by bench.overhead')\n"
        )
    return folder


def importable(tree: Path, folder: Path) -> Path:
    """A folder that, first on PYTHONPATH, imports `segserve.*` from `tree`, laid out as its
    pyproject's package-dir maps it (segserve.service from tree/service, ...): otherwise the
    editable install of this checkout answers for every subpackage the tree's `segserve/`
    folder lacks, and a baseline would run today's service code."""
    mapping = (
        tomllib.loads((tree / "pyproject.toml").read_text())
        .get("tool", {})
        .get("setuptools", {})
        .get("package-dir", {})
    )
    if "segserve" not in mapping:  # a flat tree: itself on the path is enough
        return tree
    package = folder / "segserve"
    package.mkdir(parents=True)
    for entry in (tree / mapping["segserve"]).iterdir():
        (package / entry.name).symlink_to(entry)
    for name, source in mapping.items():
        if name.startswith("segserve."):
            (package / name.removeprefix("segserve.")).symlink_to(tree / source)
    return folder


def takes_uint8(tree: Path) -> bool:
    """Whether the tree's model card knows the uint8 input contract."""
    return any("input_dtype" in card.read_text() for card in tree.rglob("contracts/card.py"))


def measure(
    tree: Path, repository: Path, levels: list[int], duration: float, images, plain_http: bool
) -> list[dict]:
    port = 20000 + os.getpid() % 1000
    # Every tree, this one too, imported the same way: the launch itself differs in nothing.
    site = importable(tree, repository.with_name(repository.name + "-site"))
    path = [str(site)]
    if plain_http:
        path.insert(0, str(without_fast_http(repository.parent / "plain-http")))
    env = {
        "SEGSERVE_REPOSITORY": str(repository),
        "SEGSERVE_WARMUP_SHAPES": "512x512",
        "PYTHONPATH": os.pathsep.join(path),
    }
    log = Path(tempfile.mkdtemp()) / "server.log"
    cmd = [sys.executable, "-m", "segserve.cli", "serve", "--port", str(port)]
    # The tree's own code (PYTHONPATH, and the working directory `-m` puts first): a baseline
    # checkout runs as it was.
    proc = subprocess.Popen(
        cmd, cwd=site, env={**os.environ, **env}, stdout=log.open("w"), stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        loadgen.wait_until_up(f"{url}/metrics", proc, 180, log)
        for n in levels:
            (stats,) = loadgen.bench(
                loadgen.Target(url), [n], duration, images, progress=False, server_pid=proc.pid
            )
            rows.append(
                {
                    "concurrency": n,
                    "throughput_rps": stats.throughput_rps,
                    "p50_ms": stats.p50_ms,
                    "p99_ms": stats.p99_ms,
                    "errors": {k: v for k, v in stats.status_counts.items() if k != "200"},
                    "server_cpu_ms_per_request": stats.server_cpu_ms_per_request,
                    "server_stage_ms": stats.server_stage_ms,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    p.add_argument("--baseline-tree", type=Path, default=None)
    p.add_argument(
        "--baseline-fast-http",
        action="store_true",
        help="let the baseline use httptools/uvloop too (default: hidden, as before they were installed)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="with a baseline: measure the pair this many times in alternating order (A B, "
        "B A, ...), so that the host's drift and the order's own effect cancel in the median",
    )
    p.add_argument("--out", type=Path, default=None, help="write overhead.json here")
    args = p.parse_args()
    images = loadgen.synthetic_images([(512, 512)], per_size=8)
    report: dict = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "image": "512x512 JPEG -> label PNG",
    }
    trees = [("segserve", ROOT, True)]
    if args.baseline_tree:
        trees.append(("baseline", args.baseline_tree, takes_uint8(args.baseline_tree)))
    rounds = args.rounds if args.baseline_tree else 1
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for label, tree, uint8 in trees if r % 2 == 0 else trees[::-1]:
                repo = Path(tmp) / f"{label}-{r}"
                model = null_model(repo, uint8)
                bare = bare_ms(model, images[0].data, uint8)
                print(f"round {r + 1} {label}: bare session.run p50 {bare:.3f} ms", flush=True)
                plain = label == "baseline" and not args.baseline_fast_http
                rows = measure(tree, repo, args.concurrency, args.duration, images, plain)
                report.setdefault(label, []).append({"bare_session_run_ms": bare, "levels": rows})
    if "baseline" in report:
        report["ratios"] = ratios(report["segserve"], report["baseline"])
        for row in report["ratios"]:
            print(
                f"c={row['concurrency']}: segserve/baseline over {rounds} round(s), median "
                f"(each): throughput {row['throughput']['median']:.2f}x "
                f"({', '.join(f'{x:.2f}' for x in row['throughput']['rounds'])}), CPU/request "
                f"{row['cpu_per_request']['median']:.2f}x "
                f"({', '.join(f'{x:.2f}' for x in row['cpu_per_request']['rounds'])})"
            )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "overhead.json").write_text(json.dumps(report, indent=2))


def ratios(new: list[dict], old: list[dict]) -> list[dict]:
    """Per concurrency: segserve / baseline throughput and server CPU per request, each round
    and their median."""
    out = []
    for i, level in enumerate(new[0]["levels"]):
        pairs = [(n["levels"][i], o["levels"][i]) for n, o in zip(new, old, strict=True)]
        tput = [a["throughput_rps"] / b["throughput_rps"] for a, b in pairs]
        cpu = [a["server_cpu_ms_per_request"] / b["server_cpu_ms_per_request"] for a, b in pairs]
        out.append(
            {
                "concurrency": level["concurrency"],
                "throughput": {"rounds": tput, "median": float(np.median(tput))},
                "cpu_per_request": {"rounds": cpu, "median": float(np.median(cpu))},
            }
        )
    return out


if __name__ == "__main__":
    main()
