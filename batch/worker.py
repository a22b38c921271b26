"""One model at work in a batch job's worker (a Ray actor, or the job's own process): each
item read by its path here, segmented by the same `Predictor` as `segserve predict` (the
variant this machine chooses, the decode limits, the scale plan and its tiles, the render),
its output written whole under its own name, its manifest row returned. A bad input is an
error row; the worker goes on."""

from __future__ import annotations

import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from segserve.batch.inputs import Item
from segserve.batch.manifest import COLUMNS, write_atomic
from segserve.contracts.repository import file_sha256
from segserve.service.errors import ServiceError
from segserve.service.predict import Predictor
from segserve.service.settings import Settings


def read_input(url: str, limit: int) -> bytes:
    """An input's bytes, at most `limit` of them (the body limit /segment has)."""
    import fsspec

    with fsspec.open(url, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ServiceError(413, f"over the {limit}-byte limit (max_body_bytes)")
    return data


class Segmenter:
    """Segments batches of items: a callable class, as Ray Data's map_batches takes one
    (constructed once per actor: the model is loaded once). `threads` items run at once,
    each on one onnxruntime thread: on two cores that was 1.2x one item at a time on two
    threads (docs/benchmarks.md, "segserve batch"), and the threads are the worker's
    CPUs either way (onnxruntime would otherwise take every core of the machine)."""

    def __init__(
        self,
        model: str,
        out: str,
        fmt: str,
        scale: str | None,
        settings: dict,
        threads: int,
    ) -> None:
        s = Settings(**{**settings, "intra_op_threads": 1})
        self.settings = s
        self.predictor = Predictor(Path(model), s, fmt, scale)
        self.out = Path(out)
        self.model_sha256 = file_sha256(Path(model))
        self.threads = max(1, threads)
        self.pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    @property
    def variant(self) -> str:
        return self.predictor.engine.variant

    def __call__(self, batch: dict) -> dict:
        """A batch of items (columns id, url, output) -> their manifest rows (columns)."""
        items = [Item(*v) for v in zip(batch["id"], batch["url"], batch["output"], strict=True)]
        rows = list(self.pool.map(self.one, items) if self.pool else map(self.one, items))
        return {c: [r.get(c) for r in rows] for c in COLUMNS}

    def one(self, item: Item) -> dict:
        t0 = time.perf_counter()
        card = self.predictor.card
        row = {
            "id": item.id,
            "input": item.url,
            "output": item.output,
            "model": card.name,
            "version": card.version,
            "model_sha256": self.model_sha256,
            "variant": self.variant,
            "worker": self.worker,
        }
        try:
            answer = self.predictor(read_input(item.url, self.settings.max_body_bytes))
            write_atomic(self.out / item.output, answer.body)
            row.update(status="ok", height=answer.size[0], width=answer.size[1])
        except ServiceError as exc:  # what /segment answers 4xx: the input's fault
            row.update(status="error", error=f"{exc.code}: {exc.detail}")
        except Exception as exc:  # unreadable file, a model that fails on it: the input's row
            row.update(status="error", error=f"{type(exc).__name__}: {exc}")
        row["ms"] = round(1000 * (time.perf_counter() - t0), 2)
        return row
