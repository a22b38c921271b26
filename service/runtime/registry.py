"""The served models and their lifecycle, in one owner: every version the repository holds is
loaded and warmed before it takes traffic, followed as the repository changes (new versions
in, removed ones retired after their queued work), listed when it fails to load, and one name
is the default. Readiness is decided here.

Requests only look models up (`get`); nothing outside this module changes what is served.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from functools import partial

import numpy as np

from segserve.contracts.card import ModelCard
from segserve.contracts.repository import VersionEntry, walk
from segserve.service.batching.batcher import Batcher, BatchRun
from segserve.service.batching.planning import BatchLimits, CostModel
from segserve.service.errors import ServiceError
from segserve.service.media.tiling import ScalePlan
from segserve.service.runtime.engine import Engine
from segserve.service.runtime.gate import CheckSetError, Scores, Verdict, VersionGate
from segserve.service.runtime.providers import ProviderUnavailable
from segserve.service.runtime.selection import select_variant
from segserve.service.runtime.variants import VariantChoice
from segserve.service.settings import Settings
from segserve.service.telemetry.clock import Stage, Timings
from segserve.service.telemetry.drift import DriftWindow
from segserve.service.telemetry.prometheus import ServiceMetrics
from segserve.service.telemetry.tracing import Tracing

log = logging.getLogger("segserve")


@dataclass(eq=False)
class ServedModel:
    name: str
    version: int
    engine: Engine  # the variant that serves
    batcher: Batcher
    warmed: bool = False
    choice: VariantChoice | None = None  # which variant serves, and why
    files: tuple[tuple[str, float], ...] = ()  # the version's files when it was loaded

    @property
    def variant(self) -> str:
        """The candidate that serves: "float32", "int8", "openvino-bf16", ..."""
        return self.engine.variant

    @property
    def variants(self) -> list[str]:
        """The variants the version had on disk when it was loaded."""
        return self.choice.available if self.choice else [self.variant]

    @property
    def card(self) -> ModelCard:
        return self.engine.card


@dataclass(frozen=True)
class FailedModel:
    name: str
    version: int
    error: str
    mtime: float = 0.0  # of the file that failed: a changed file is tried again


class ModelRegistry:
    def __init__(
        self, settings: Settings, metrics: ServiceMetrics, tracing: Tracing | None = None
    ) -> None:
        self.settings, self.metrics = settings, metrics
        self.tracing = tracing or Tracing()
        self._models: dict[str, dict[int, ServedModel]] = {}
        self._failed: dict[tuple[str, int], FailedModel] = {}
        self._default: str | None = None
        self.serving = False  # between the end of start() and a drain or stop()
        self.draining = False  # set by drain(): unready, still answering
        self._watcher: asyncio.Task | None = None
        self._retiring: set[asyncio.Task] = set()
        self.gate = VersionGate(settings.gate_tolerance, settings.gate_class_floor)
        self._drift: dict[tuple[str, int], DriftWindow] = {}
        metrics.follow(lambda: [(m.name, m.batcher.saturation()) for m in self.all()])

    # -- what requests and listings read ---------------------------------------------

    @property
    def default_name(self) -> str | None:
        return self._default

    @property
    def names(self) -> list[str]:
        return sorted(self._models)

    @property
    def failed(self) -> list[FailedModel]:
        return [self._failed[k] for k in sorted(self._failed)]

    def all(self) -> list[ServedModel]:
        return [m for name in self.names for _, m in sorted(self._models[name].items())]

    def versions(self, name: str) -> list[int]:
        return sorted(self._models.get(name, {}))

    def get(self, name: str | None, version: int | None = None) -> ServedModel:
        """A model by name (default: the default model) and version (default: newest)."""
        name = name or self._default
        if name is None:
            raise ServiceError(404, "no model is loaded")
        versions = self._models.get(name)
        if not versions:
            why = (
                " (it failed to load: see /models)"
                if any(n == name for n, _ in self._failed)
                else ""
            )
            loaded = ", ".join(self.names) or "none"
            raise ServiceError(404, f"unknown model {name!r}{why}; loaded: {loaded}")
        if version is None:
            return versions[self.gate.default_version(name, list(versions))]
        if version not in versions:
            refusal = self.gate.refused.get((name, version))
            why = f" (refused by the check-set gate: {refusal.reason})" if refusal else ""
            raise ServiceError(
                404, f"model {name!r} has no version {version}{why}; it has {sorted(versions)}"
            )
        return versions[version]

    def unready_reason(self) -> str:
        """Why the server cannot serve, or "" when it can: started, not stopping, and the
        default model and every required model loaded and warm. Other models that failed do
        not count (they are in /models and segserve_model_load_failures). No file paths in
        the reason: /readyz is public."""
        if self.draining:
            return "draining for shutdown"
        if not self.serving:
            return "starting or shutting down"
        needed = [self._default, *self.settings.required]
        if needed[0] is None:
            return "no model is loaded" if not self._failed else "no model loaded successfully"
        missing = sorted({n for n in needed if n not in self._models})
        if missing:
            return f"required models not loaded: {', '.join(missing)}"
        cold = sorted({n for n in needed if not self.get(n).warmed})
        if cold:
            return f"models warming up: {', '.join(cold)}"
        return ""

    @property
    def ready(self) -> bool:
        return not self.unready_reason()

    # -- the lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Load and warm every version in the repository, then serve (and, with
        `repository_poll_s`, keep following the repository)."""
        if not self.settings.repository.is_dir():
            log.error("model repository %s does not exist", self.settings.repository)
        await self.sync(at_start=True)
        self.serving = True
        log.info("ready: %s", self.unready_reason() or "yes")
        if self.settings.repository_poll_s > 0:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    def drain(self) -> None:
        """Turn unready while still serving (the first step of a shutdown)."""
        self.draining = True

    async def stop(self) -> None:
        """Refuse new work and finish what is queued (after the server stopped accepting)."""
        self.serving = False
        if self._watcher is not None:
            self._watcher.cancel()
        await asyncio.gather(*(m.batcher.stop() for m in self.all()), *self._retiring)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.repository_poll_s)
            try:
                await self.sync()
            except Exception:  # a failed look at the repository must not end the watching
                log.exception("could not sync the model repository")

    async def sync(self, at_start: bool = False) -> None:
        """Make the served models what the repository holds: versions that appeared are
        loaded and warmed before they take traffic (the newest of a name serves requests
        that name no version); versions that disappeared stop taking requests and finish
        what they have. A version that fails to load is listed (and retried once its file
        changes); whatever served before goes on serving."""
        entries = {
            (e.name, e.version): e
            for e in await asyncio.to_thread(lambda: list(walk(self.settings.repository)))
        }
        for model in [m for m in self.all() if (m.name, m.version) not in entries]:
            self._retire(model)
        for folder in {e.folder.parent for e in entries.values()}:
            try:
                await asyncio.to_thread(self.gate.refresh, folder)
            except (OSError, ValueError) as exc:
                log.error(
                    "%s: its check set cannot be read (versions go ungated): %s", folder.name, exc
                )
        self.gate.forget(set(entries))
        for key, entry in sorted(entries.items()):
            served = self._models.get(key[0], {}).get(key[1])
            if served is not None:
                await self._reload_if_changed(served, entry)
                continue
            try:
                files = await asyncio.to_thread(_files, entry)
            except OSError:
                continue  # removed while we looked
            if self.gate.still_refused(*key, files):
                continue  # the same files the gate refused
            failed = self._failed.get(key)
            if failed is not None and failed.mtime == files[0][1]:
                continue  # the same file that failed before
            await self._activate(entry, files[0][1], fatal_provider=at_start)
        for key in [k for k in self._failed if k not in entries]:
            del self._failed[key]
            with contextlib.suppress(KeyError):
                self.metrics.load_failures.remove(key[0], str(key[1]))
        self._choose_default()
        self._publish_serving()

    async def _passes_gate(self, model: ServedModel) -> bool:
        """Score a loaded version on its model's check set (once) and judge it against the
        version serving now; a refused one is dropped (its sessions go with it), listed with
        its scores and reason, logged and counted. Without a check set: ungated, it passes."""
        key = (model.name, model.version)
        loaded = self._models.get(model.name, {})
        current = loaded[self.gate.default_version(model.name, list(loaded))] if loaded else None
        self.gate.reviewing.add(key)
        try:
            scores = await asyncio.to_thread(self._scores, model)
            serving = await asyncio.to_thread(self._scores, current) if current else None
        except CheckSetError as exc:  # the set's fault, not the version's
            log.error("%s: its check set does not fit the model: %s", model.name, exc)
            scores, serving = None, None
            verdict = Verdict(True, f"ungated: the check set does not fit the model ({exc})")
        except Exception as exc:  # a version that fails on the check set does not serve
            scores, serving = None, None
            verdict = Verdict(False, f"failed on the check set: {type(exc).__name__}: {exc}")
        else:
            verdict = self.gate.judge(
                model.name, scores, serving, model.card.class_floor, model.card.class_names
            )
        finally:
            self.gate.reviewing.discard(key)
        if scores is not None:
            self.metrics.checkset_mean_iu.labels(model.name, str(model.version)).set(scores.mean_iu)
        if not verdict.passed:
            self.metrics.gate_decisions.labels(model.name, "refused").inc()
            self.gate.refuse(model.name, model.version, verdict.reason, scores, model.files)
            log.warning("refused %s v%s: %s", model.name, model.version, verdict.reason)
            return False
        self._drift[key] = DriftWindow(
            self.settings.drift_window, scores.predicted_mix if scores else None
        )
        log.info("%s v%s passed the gate: %s", model.name, model.version, verdict.reason)
        return True

    def _shadowed(self, name: str) -> bool:
        return self.settings.shadow_fraction > 0 and (
            not self.settings.shadow or name in self.settings.shadow
        )

    def candidate(self, name: str) -> ServedModel | None:
        """The version of `name` on shadow trial, if any."""
        keys = sorted(k for k in self.gate.candidates if k[0] == name)
        return self._models.get(name, {}).get(keys[-1][1]) if keys else None

    def settle(self, model: ServedModel, promote: bool, reason: str) -> None:
        """A candidate's shadow trial ends: it serves, or it is refused (unloaded, listed
        with the reason; what it has queued still finishes)."""
        key = (model.name, model.version)
        if key not in self.gate.candidates:
            return
        self.gate.candidates.discard(key)
        outcome = "promoted" if promote else "refused"
        self.metrics.gate_decisions.labels(model.name, outcome).inc()
        if promote:
            log.info("%s v%s promoted after shadow traffic: %s", *key, reason)
        else:
            scores = self.gate.cached(model.name, model.version, model.files)
            self.gate.refuse(model.name, model.version, reason, scores, model.files)
            log.warning("refused %s v%s after shadow traffic: %s", *key, reason)
            self._retire(model)
        self._publish_serving()

    def _scores(self, model: ServedModel) -> Scores | None:
        return self.gate.scores(
            model.name,
            model.version,
            model.files,
            lambda rgb: model.engine.segment([rgb])[0],
            model.card.num_classes,
        )

    def observe_labels(self, model: ServedModel, counts: np.ndarray) -> None:
        """One answered image's class pixel counts: the drift counters and score."""
        version = str(model.version)
        names = model.card.class_names
        for i in np.flatnonzero(counts):
            self.metrics.predicted_pixels.labels(model.name, version, names[i]).inc(int(counts[i]))
        self.metrics.dominant_images.labels(model.name, version, names[int(counts.argmax())]).inc()
        window = self._drift.get((model.name, model.version))
        if window is not None:
            window.observe(counts)
            if (drift := window.score()) is not None:
                self.metrics.class_mix_drift.labels(model.name, version).set(drift)

    def _publish_serving(self) -> None:
        for name, versions in self._models.items():
            self.metrics.serving_version.labels(name).set(
                self.gate.default_version(name, list(versions))
            )

    def states(self, name: str) -> list[dict]:
        """Every version of a model the server knows, with its state and check-set scores:
        serving (requests that name no version get it), pinned (serving because pinned),
        loaded (reachable by its number: the versions to roll back to), refused."""
        loaded = self._models.get(name, {})
        default = self.gate.default_version(name, list(loaded)) if loaded else None
        out = []
        for version, model in sorted(loaded.items()):
            state = "candidate" if (name, version) in self.gate.candidates else "loaded"
            if version == default:
                state = "pinned" if self.gate.pins.get(name) == version else "serving"
            scores = self.gate.cached(name, version, model.files)
            reason = None if scores else "ungated: the model has no check set"
            out.append(
                {
                    "version": version,
                    "state": state,
                    "scores": scores and scores.as_dict(),
                    "reason": reason,
                }
            )
        for (n, version), refusal in sorted(self.gate.refused.items()):
            if n == name:
                scores = refusal.scores and refusal.scores.as_dict()
                out.append(
                    {
                        "version": version,
                        "state": "refused",
                        "scores": scores,
                        "reason": refusal.reason,
                    }
                )
        out.extend(
            {
                "version": v,
                "state": "candidate",
                "scores": None,
                "reason": "being scored on the check set",
            }
            for n, v in sorted(self.gate.reviewing)
            if n == name
        )
        return sorted(out, key=lambda v: v["version"])

    async def _reload_if_changed(self, served: ServedModel, entry: VersionEntry) -> None:
        """A served version whose files changed (a variant added by `segserve quantize`,
        say) is loaded again beside it and takes over once ready; until then, and if the new
        files fail to load, the one loaded before goes on serving."""
        try:
            files = await asyncio.to_thread(_files, entry)
        except OSError:  # removed while we looked: the next sync retires it
            return
        if files == served.files:
            return
        try:
            model = await asyncio.to_thread(self._load, entry)
        except Exception as exc:
            log.error(
                "%s v%s changed but does not load (still serving what was loaded): %s",
                entry.name,
                entry.version,
                exc,
            )
            served.files = files  # not tried again until the files change again
            return
        self._swap(served, model)
        log.info(
            "reloaded %s v%s: now serving its %s variant", model.name, model.version, model.variant
        )

    def _swap(self, old: ServedModel, new: ServedModel) -> None:
        new.batcher.start()
        self._models[new.name][new.version] = new
        self._unpublish(old)
        self._publish(new)
        self._stop_later(old)

    def _publish(self, model: ServedModel) -> None:
        self.metrics.model_info.labels(*_info_labels(model)).set(1)
        for variant, seconds in (model.choice.seconds if model.choice else {}).items():
            self.metrics.variant_seconds.labels(model.name, str(model.version), variant).set(
                seconds
            )

    def _unpublish(self, model: ServedModel) -> None:
        with contextlib.suppress(KeyError):
            self.metrics.model_info.remove(*_info_labels(model))
        for variant in model.choice.seconds if model.choice else ():
            with contextlib.suppress(KeyError):
                self.metrics.variant_seconds.remove(model.name, str(model.version), variant)

    def _stop_later(self, model: ServedModel) -> None:
        """What `model` has queued or running still finishes; then its batcher stops."""
        task = asyncio.get_running_loop().create_task(model.batcher.stop())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _activate(self, entry: VersionEntry, mtime: float, fatal_provider: bool) -> None:
        key = (entry.name, entry.version)
        try:
            model = await asyncio.to_thread(self._load, entry)
        except ProviderUnavailable:
            if fatal_provider:
                raise  # a provider asked for by name must load: a start-up error
            log.exception("could not load %s v%s", *key)
            self._fail(entry, mtime, "the execution provider asked for did not load")
            return
        except Exception as exc:  # any other load failure is reported, never fatal
            log.error("could not load %s v%s: %s", entry.name, entry.version, exc)
            self._fail(entry, mtime, f"{type(exc).__name__}: {exc}")
            return
        if not await self._passes_gate(model):
            return
        if not fatal_provider and self._shadowed(model.name) and model.name in self._models:
            # Appeared while serving: on trial behind shadow traffic before it serves.
            self.gate.candidates.add(key)
            log.info("%s v%s is a candidate: shadowing live traffic", *key)
        elif self.gate.check_set(model.name) is not None:
            self.metrics.gate_decisions.labels(model.name, "promoted").inc()
        model.batcher.start()
        self._models.setdefault(model.name, {})[model.version] = model
        self._failed.pop(key, None)
        self.metrics.load_failures.labels(model.name, str(model.version)).set(0)
        self._publish(model)
        log.info(
            "serving %s v%s (%s, %s, %s: %s)",
            model.name,
            model.version,
            model.card.architecture,
            model.engine.provider,
            model.variant,
            model.choice.reason if model.choice else "",
        )

    def _fail(self, entry: VersionEntry, mtime: float, error: str) -> None:
        self._failed[(entry.name, entry.version)] = FailedModel(
            entry.name, entry.version, error, mtime
        )
        self.metrics.load_failures.labels(entry.name, str(entry.version)).set(1)

    def _retire(self, model: ServedModel) -> None:
        """No new requests reach `model`; what it has queued or running still finishes."""
        versions = self._models[model.name]
        del versions[model.version]
        if not versions:
            del self._models[model.name]
        self._unpublish(model)
        self._drift.pop((model.name, model.version), None)
        self._stop_later(model)
        log.info("retired %s v%s (gone from the repository)", model.name, model.version)

    def _choose_default(self) -> None:
        wanted = self.settings.default_model
        if wanted:
            if wanted not in self._models and self._default != wanted:
                log.error("default model %r is not loaded", wanted)
            self._default = wanted  # unready until it is loaded
        elif self._default not in self._models:
            self._default = self.names[0] if self._models else None

    def _load(self, entry: VersionEntry) -> ServedModel:
        """A version, ready to serve: its candidates loaded, warmed, timed and checked on
        this machine (service/runtime/selection.py), what serves warmed at its tile too, its
        cost model seeded with its timed runs, its check-set scores kept for the gate."""
        s = self.settings
        selection = select_variant(
            entry.model_path,
            entry.card_path,
            entry.variant_paths(),
            s,
            self.gate.check_set(entry.name),
        )
        engine, choice = selection.engine, selection.choice
        runs = list(selection.runs)
        for h, w in [t for t in self.warm_shapes(engine) if t not in s.warmup]:
            tile = [np.zeros((h, w, 3), np.uint8)]
            engine.segment(tile)  # the tile: once to warm, twice timed (the faster counts)
            took = []
            for _ in range(2):
                t0 = time.perf_counter()
                engine.segment(tile)
                took.append(time.perf_counter() - t0)
            runs.append((h * w, min(took)))
        batch_pixels = min(s.max_batch_pixels, engine.batch_pixel_limit or s.max_batch_pixels)
        limits = BatchLimits(
            s.batch_size_for(engine.provider), batch_pixels, engine.card.size_divisor
        )
        batcher = Batcher(
            engine.stack,
            engine.run,
            limits,
            CostModel(),
            max_queue=s.max_queue,
            max_queued_pixels=s.max_queued_pixels,
            max_queue_delay_ms=s.max_queue_delay_ms,
            on_batch=partial(
                record_batch,
                self.metrics,
                entry.name,
                self.tracing,
                entry.version,
                choice.variant,
            ),
        )
        for pixels, took in runs:  # the cost model's first measurements: warm runs
            batcher.cost.observe(pixels, took)
        files = _files(entry)
        if selection.scores is not None and selection.check is not None:
            self.gate.remember(entry.name, entry.version, files, selection.check, selection.scores)
        return ServedModel(entry.name, entry.version, engine, batcher, True, choice, files)

    def warm_shapes(self, engine: Engine) -> list[tuple[int, int]]:
        """The warm-up shapes, and the tile of a model that may run large images in tiles:
        the shape every large image runs, and the one its first prediction needs (from
        small shapes alone the cost model overrates a tile: fixed costs weigh more there,
        and a 12 MP image on a fresh server was refused as past its deadline)."""
        shapes = list(self.settings.warmup)
        card = engine.card
        if "native" in card.scale_policies:
            plan = ScalePlan.for_card(card, "native", self.settings.tile_size_for(engine.provider))
            shapes.append((plan.tile, plan.tile))
        return list(dict.fromkeys(shapes))


def _files(entry: VersionEntry) -> tuple[tuple[str, float], ...]:
    """What a version is made of on disk, to see it change: each variant file and its mtime."""
    paths = [entry.model_path, *entry.variant_paths().values()]
    return tuple((p.name, p.stat().st_mtime) for p in paths)


def record_batch(
    metrics: ServiceMetrics,
    model: str,
    tracing: Tracing,
    version: int,
    variant: str,
    run: BatchRun,
) -> None:
    """What a run of the engine adds to its requests' clocks (the `Timings` each request
    submits as its jobs' context), to the batch metrics, and (traced) to the trace."""
    for job in run.jobs:
        if isinstance(job.context, Timings):
            job.context.longest(Stage.QUEUE, run.started - job.enqueued)
            job.context.interval(Stage.QUEUE, job.enqueued, run.started)
            job.context.interval(
                Stage.INFERENCE, run.started, run.started + run.run_s, batch_size=len(run.jobs)
            )
    if tracing.enabled:
        tracing.batch(run, model, version, variant)
    for timings in run.contexts():
        if isinstance(timings, Timings):
            timings.add(Stage.PREPROCESS, run.prepare_s)
            if not run.failed:
                timings.add(Stage.INFERENCE, run.run_s)
    if not run.failed:
        metrics.batch_size.labels(model).observe(len(run.jobs))
        metrics.batch_pixels.labels(model).inc(run.pixels)
        metrics.padding_pixels.labels(model).inc(run.padding)


def _info_labels(model: ServedModel) -> tuple[str, str, str, str, str]:
    return (
        model.name,
        str(model.version),
        model.engine.provider,
        model.card.architecture,
        model.variant,
    )
