"""`segserve batch INPUT --model MODEL --out DIR`: one output per input, a Parquet manifest,
resumable. Plans the job (the inputs, what an earlier run of the same model already made),
runs what is left on an engine, keeps the manifest's rows as they come, and says how it
went: images, errors, images/s; the exit code says whether the errors stayed under the
rate allowed."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from segserve.batch import engines
from segserve.batch.inputs import list_inputs
from segserve.batch.manifest import Manifest, sweep_temporaries
from segserve.contracts.repository import file_sha256
from segserve.errors import UserError
from segserve.service.settings import Settings

# A part of the manifest is written this often at least: a killed driver loses at most
# these rows, whose outputs a rerun makes again (measured with 64 rows / 5 s: 39 of 40).
FLUSH_ROWS, FLUSH_S = 16, 1.0


class BatchError(UserError):
    """A job that cannot start as asked (another model's outputs in the folder, ...)."""


@dataclass(frozen=True)
class BatchJob:
    input: str
    model: Path
    out: Path
    fmt: str = "png"
    scale: str | None = None
    engine: str = "auto"  # auto (Ray when a cluster is named), ray, local
    ray_address: str | None = None
    actors: int | None = None
    threads: int | None = None
    batch_size: int = 8
    overwrite: bool = False
    max_error_rate: float = 0.01
    progress: bool = True


@dataclass(frozen=True)
class Summary:
    inputs: int  # in INPUT
    skipped: int  # done by an earlier run of the same model
    processed: int  # this run
    errors: int  # inputs whose row says error, after this run
    seconds: float
    engine: str
    first_s: float = 0.0  # until the first image was done: start-up and model load

    @property
    def images_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_images_per_s(self) -> float:
        """After the first image: what the job does once its workers are up."""
        working = self.seconds - self.first_s
        return (self.processed - 1) / working if self.processed > 1 and working > 0 else 0.0

    @property
    def error_rate(self) -> float:
        return self.errors / self.inputs if self.inputs else 0.0

    def line(self) -> str:
        return (
            f"{self.processed} images in {self.seconds:.1f} s ({self.images_per_s:.2f} images/s; "
            f"{self.steady_images_per_s:.2f} after the first, at {self.first_s:.1f} s; "
            f"{self.engine}); {self.skipped} already done; {self.errors} errors of "
            f"{self.inputs} inputs ({self.error_rate:.2%})"
        )


def engine_name(job: BatchJob) -> str:
    """auto: Ray Data when a cluster is named (--ray-address, RAY_ADDRESS), else this
    process. On one machine the process alone is the faster (measured on two cores: 10.3
    images/s in-process, 7.3 on a local Ray that starts for the job; docs/benchmarks.md,
    "segserve batch"); --engine ray starts a local Ray anyway."""
    if job.engine != "auto":
        return job.engine
    return "ray" if job.ray_address else "local"


def run_batch(job: BatchJob, settings: Settings) -> Summary:
    """Run the job; every input ends with one output (or an error row) and one row."""
    try:
        import pyarrow  # noqa: F401  (the manifest)
    except ImportError as exc:
        raise BatchError("segserve batch writes Parquet: pip install 'segserve[batch]'") from exc
    model = job.model.resolve()
    if not model.is_file():
        raise BatchError(f"model not found: {job.model}")
    items = list_inputs(job.input, job.fmt)
    job.out.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(job.out)
    manifest = Manifest(job.out)
    sha = file_sha256(model)
    rows = manifest.read()
    others = sorted({r["model_sha256"][:12] for r in rows.values() if r["model_sha256"] != sha})
    if others and not job.overwrite:
        raise BatchError(
            f"{job.out} holds outputs of another model (sha256 {', '.join(others)}...; this "
            f"one is {sha[:12]}...): choose another folder, or --overwrite to replace them"
        )
    if others:
        manifest.clear()
        rows = {}
    done = {
        i.id
        for i in items
        if (r := rows.get(i.id)) is not None
        and r["status"] == "ok"
        and r["output"] == i.output
        and (job.out / i.output).is_file()
    }
    todo = [i for i in items if i.id not in done]
    engine = engine_name(job)
    spec = engines.WorkerSpec(
        str(model), str(job.out.resolve()), job.fmt, job.scale, settings.model_dump(mode="json")
    )
    t0 = time.perf_counter()
    first = 0.0
    if todo:
        if engine == "ray":
            stream = engines.run_ray(
                todo, spec, job.ray_address, job.actors, job.threads, job.batch_size
            )
        else:
            stream = engines.run_local(todo, spec, job.threads)
        first = _collect(stream, manifest, len(todo), job.progress) - t0
    seconds = time.perf_counter() - t0
    final = manifest.consolidate()
    errors = sum(final[i.id]["status"] != "ok" for i in items if i.id in final)
    return Summary(len(items), len(done), len(todo), errors, seconds, engine, first)


def _collect(stream, manifest: Manifest, total: int, progress: bool) -> float:
    """Rows as they come, written in parts (a killed job loses at most the last part's
    rows, whose outputs a rerun makes again); returns when the first came."""
    from tqdm import tqdm

    pending: list[dict] = []
    flushed, first = time.monotonic(), 0.0
    with tqdm(total=total, desc="batch", unit="img", disable=not progress, file=sys.stderr) as bar:
        for row in stream:
            first = first or time.perf_counter()
            pending.append(row)
            bar.update(1)
            if len(pending) >= FLUSH_ROWS or time.monotonic() - flushed > FLUSH_S:
                manifest.append(pending)
                pending, flushed = [], time.monotonic()
    manifest.append(pending)
    return first
