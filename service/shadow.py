"""Shadow traffic: a candidate version answers a sample of live requests in the background,
its answers compared with the served ones and thrown away, before it may serve.

A check set is small and fixed; live traffic is what the version will meet. With
`shadow_fraction` > 0, a version that passes the check-set gate while another serves is a
*candidate* (runtime/registry.py): after each served answer of its model, with that
probability, the same images go through the candidate's own batcher. Its labels are scored
against the served labels (mean IU of one against the other); after `shadow_min_requests`
the candidate serves if the mean is at least `shadow_min_agreement`, else it is refused.

Shadow work never delays the answer it copies (it starts after that answer's labels exist)
and yields: it is skipped when requests wait for the serving version or the candidate still
has shadow work queued (it fills idle time only), when the pixel budget has no room now
(never waited for), for images in tiles (a 40 MP image would cost
its full run again), and when the candidate's batcher refuses it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from segserve.service.batching.batcher import Rejected
from segserve.service.limits import Lease, PixelBudget
from segserve.service.runtime.registry import ModelRegistry, ServedModel
from segserve.service.settings import Settings
from segserve.service.telemetry.prometheus import ServiceMetrics
from segserve.training.metrics import ConfusionMatrix, segmentation_scores

log = logging.getLogger("segserve")


def label_agreement(served: np.ndarray, shadow: np.ndarray, num_classes: int) -> float:
    """Mean IU of the shadow labels against the served ones (classes in either; scored as
    `segserve eval` scores labels against the truth); 1.0 when both are the same map."""
    matrix = ConfusionMatrix(num_classes, ignore_index=-1)  # every served label counts
    matrix.update(shadow, served)
    mean_iu = segmentation_scores(matrix.matrix)["mean_iu"]
    return 1.0 if np.isnan(mean_iu) else mean_iu


@dataclass
class Trial:
    requests: int = 0
    agreement_sum: float = 0.0
    errors: int = 0

    @property
    def agreement(self) -> float:
        return self.agreement_sum / self.requests if self.requests else 0.0


class Shadow:
    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        budget: PixelBudget,
        metrics: ServiceMetrics,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self.settings, self.registry, self.budget, self.metrics = (
            settings,
            registry,
            budget,
            metrics,
        )
        self.draw = draw
        self.trials: dict[tuple[str, int], Trial] = {}
        self._tasks: set[asyncio.Task] = set()

    def offer(self, model: ServedModel, rgbs: list[np.ndarray], labels: list[np.ndarray]) -> None:
        """After `model` answered a request (images at inference size, their labels): maybe
        have its model's candidate answer the same in the background."""
        candidate = self.registry.candidate(model.name)
        if candidate is None or candidate is model or self.draw() >= self.settings.shadow_fraction:
            return
        version = str(candidate.version)
        # Yield: only into idle time, when nothing waits for the serving version and the
        # candidate has no shadow work left (measured: shadowing a saturated server costs
        # its clients what the extra runs cost, docs/benchmarks.md "Shadow traffic").
        if model.batcher.depth > 0 or candidate.batcher.depth > 0:
            self.metrics.shadow_requests.labels(model.name, version, "skipped").inc()
            return
        lease = Lease(self.budget)
        if not lease.try_take(sum(r.shape[0] * r.shape[1] for r in rgbs)):
            self.metrics.shadow_requests.labels(model.name, version, "skipped").inc()
            return
        task = asyncio.get_running_loop().create_task(self._run(candidate, rgbs, labels, lease))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(
        self, candidate: ServedModel, rgbs: list[np.ndarray], served: list[np.ndarray], lease: Lease
    ) -> None:
        key = (candidate.name, candidate.version)
        version = str(candidate.version)
        trial = self.trials.setdefault(key, Trial())
        t0 = time.perf_counter()
        try:
            payloads = [(candidate.engine.prepare(r), r.shape[:2]) for r in rgbs]
            deadline = time.monotonic() + self.settings.request_timeout_s
            jobs = candidate.batcher.submit(payloads, deadline)
            answers = await asyncio.gather(*(j.future for j in jobs))
        except Rejected:
            self.metrics.shadow_requests.labels(candidate.name, version, "skipped").inc()
            return
        except Exception as exc:  # the candidate failed where the served version did not
            log.warning("shadow run of %s v%s failed: %s", *key, exc)
            trial.errors += 1
            trial.requests += 1
            self.metrics.shadow_requests.labels(candidate.name, version, "error").inc()
        else:
            n = candidate.card.num_classes
            pairs = list(zip(served, answers, strict=True))
            agreement = await asyncio.to_thread(  # a few ms a megapixel: not on the loop
                lambda: float(np.mean([label_agreement(s, a, n) for s, a in pairs]))
            )
            trial.requests += 1
            trial.agreement_sum += agreement
            self.metrics.shadow_requests.labels(candidate.name, version, "ok").inc()
            self.metrics.shadow_agreement.labels(candidate.name, version).set(trial.agreement)
            self.metrics.shadow_duration.labels(candidate.name, version).observe(
                time.perf_counter() - t0
            )
        finally:
            lease.release()
        self._decide(candidate, trial)

    def _decide(self, candidate: ServedModel, trial: Trial) -> None:
        s = self.settings
        if trial.requests < s.shadow_min_requests:
            return
        passed = trial.errors == 0 and trial.agreement >= s.shadow_min_agreement
        reason = (
            f"{trial.requests} shadowed requests, mean IU against the served answers "
            f"{trial.agreement:.4f} (at least {s.shadow_min_agreement} needed), "
            f"{trial.errors} errors"
        )
        self.registry.settle(candidate, passed, reason)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
