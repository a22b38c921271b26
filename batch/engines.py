"""Where a batch job's items run: Ray Data across a cluster (an actor pool, each actor one
loaded model), or this process alone when Ray is not installed or not asked for. Both take
the job's items and yield manifest rows as they are done; they know nothing of manifests.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass

from segserve.batch.inputs import Item
from segserve.batch.worker import Segmenter
from segserve.errors import UserError

log = logging.getLogger("segserve.batch")


class EngineError(UserError):
    """The engine asked for cannot run (Ray not installed, no cluster at the address)."""


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker loads: Segmenter's arguments but its threads."""

    model: str
    out: str
    fmt: str
    scale: str | None
    settings: dict

    def segmenter(self, threads: int) -> Segmenter:
        return Segmenter(self.model, self.out, self.fmt, self.scale, self.settings, threads)


def run_local(items: list[Item], spec: WorkerSpec, threads: int | None) -> Iterator[dict]:
    """In this process: one loaded model, `threads` items at once (default: the cores)."""
    threads = threads or os.cpu_count() or 1
    segmenter = spec.segmenter(1)
    log.info("in this process: %s, %d items at once", segmenter.variant, threads)
    with ThreadPoolExecutor(threads) as pool:
        for done in as_completed(pool.submit(segmenter.one, item) for item in items):
            yield done.result()


@dataclass(frozen=True)
class Pool:
    """An actor pool sized to a cluster: `actors` actors of `threads` threads, each holding
    `cpus` of Ray's logical CPUs."""

    actors: int
    threads: int
    cpus: float

    @classmethod
    def for_cluster(cls, node_cpus: list[float], actors: int | None, threads: int | None) -> Pool:
        """Threads: the smallest node's cores, at most 4 (default); actors: as many as the
        cluster's cores hold (default). Together the actors hold at most the cluster's CPUs
        less half of one: Ray Data launches its actors first, and a pool that takes every
        CPU leaves none for its other tasks and hangs (ray-project/ray#44687; measured on
        two CPUs: 2 actors x 1 CPU hung, 1 actor x 0.5 CPU ran)."""
        node_cpus = [c for c in node_cpus if c > 0]  # a head started with num-cpus 0
        total = sum(node_cpus)
        if total < 1:
            raise EngineError(f"the Ray cluster has {total} CPUs: no room for a worker")
        threads = threads or max(1, min(4, int(min(node_cpus))))
        actors = actors or max(1, int(total // threads))
        cpus = min(float(threads), (total - 0.5) / actors)
        return cls(actors, threads, round(cpus, 3))


def run_ray(
    items: list[Item],
    spec: WorkerSpec,
    address: str | None,
    actors: int | None,
    threads: int | None,
    batch_size: int,
) -> Iterator[dict]:
    """On Ray Data: the items as a dataset of paths (each actor reads its images itself),
    map_batches over an actor pool, rows back as each batch is done. A failed actor (a node
    gone) is restarted and its batch run again elsewhere."""
    try:
        import ray
    except ImportError as exc:
        raise EngineError("Ray is not installed: pip install 'segserve[ray]'") from exc
    if not ray.is_initialized():
        try:
            ray.init(
                address=address,
                include_dashboard=False,
                logging_config=ray.LoggingConfig(log_level="WARNING"),
            )
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise EngineError(f"could not reach a Ray cluster at {address!r}: {exc}") from exc
    nodes = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    pool = Pool.for_cluster(nodes, actors, threads)
    log.info("Ray cluster of %d nodes, %s CPUs: %s", len(nodes), sum(nodes), pool)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its plans: ours say enough
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the job has its own
    context.execution_options.preserve_order = False
    dataset = ray.data.from_items(
        [{"id": i.id, "url": i.url, "output": i.output} for i in items],
        # A block a batch: rows reach the driver (and its manifest) as each batch is done,
        # not when a block of hundreds is (a killed driver loses less, the bar moves).
        override_num_blocks=max(1, min(-(-len(items) // batch_size), 20_000)),
    )
    done = dataset.map_batches(
        Segmenter,
        fn_constructor_kwargs={**asdict(spec), "threads": pool.threads},
        batch_size=batch_size,
        batch_format="numpy",
        # Ray Data's actors restart when lost (max_restarts -1) and the batch an actor held
        # runs again on another (max_task_retries -1): its defaults, which the job needs.
        compute=ray.data.ActorPoolStrategy(size=pool.actors),
        num_cpus=pool.cpus,
    )  # fmt: skip
    for batch in done.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield from batch.to_pylist()
