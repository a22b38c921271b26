"""The Prometheus metrics: the names of docs/design.md, in a registry of the app's own, and the
saturation gauges read from each model's batcher at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from segserve.service.telemetry.clock import Timings

# Dense around the paper's 0.2 s per image, where an SLO line is drawn.
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.125,
    0.15,
    0.175,
    0.2,
    0.225,
    0.25,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
STAGE_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256)
PIXEL_BUCKETS = (
    64 * 64,
    128 * 128,
    256 * 256,
    512 * 512,
    640 * 480,
    1024 * 768,
    1920 * 1080,
    4096 * 2160,
    8192 * 8192,
)


# (attribute, metric name, help): read from each model's batcher at scrape time.
SATURATION = (
    ("queued_images", "segserve_queue_depth", "Images waiting for a batch"),
    ("queued_pixels", "segserve_queued_pixels", "Pixels waiting for a batch (inference size)"),
    (
        "running_pixels",
        "segserve_running_pixels",
        "Pixels of the batch running now, padding included",
    ),
    (
        "batch_capacity_pixels",
        "segserve_batch_capacity_pixels",
        "The most pixels one batch may compute",
    ),
    (
        "predicted_wait_s",
        "segserve_predicted_wait_seconds",
        "Predicted wait of a request arriving now, before its own run: add a replica when it stays above the latency you allow for queueing",
    ),
    (
        "oldest_wait_s",
        "segserve_oldest_wait_seconds",
        "How long the oldest waiting image has waited",
    ),
)


# A model's saturation now: any object with the attributes SATURATION names, which adds up
# with `+` over the versions of one name (the batcher's `Saturation`).
SaturationReading = Any


class SaturationCollector:
    """Saturation gauges per model, computed when Prometheus scrapes (never stale)."""

    def __init__(self, read: Callable[[], Iterable[tuple[str, SaturationReading]]]) -> None:
        self.read = read

    def describe(self) -> list:
        return []  # unknown until scraped: the registry must not collect at registration

    def collect(self) -> Iterator[GaugeMetricFamily]:
        per_model: dict[str, SaturationReading] = {}
        for name, now in self.read():
            per_model[name] = per_model[name] + now if name in per_model else now
        for field, name, help_ in SATURATION:
            family = GaugeMetricFamily(name, help_, labels=["model"])
            for model, now in sorted(per_model.items()):
                family.add_metric([model], getattr(now, field))
            yield family


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        # One metric a line, unformatted: the block reads as the table of names in docs/design.md.
        # fmt: off
        self.requests = Counter("segserve_requests_total", "Requests answered", ["model", "route", "status"], registry=r)
        self.request_duration = Histogram("segserve_request_duration_seconds", "Time from request to response", ["model", "route"], buckets=LATENCY_BUCKETS, registry=r)
        self.stage_duration = Histogram("segserve_stage_duration_seconds", "Time per pipeline stage", ["model", "stage"], buckets=STAGE_BUCKETS, registry=r)
        self.inflight = Gauge("segserve_inflight_requests", "Requests being handled", registry=r)
        # Request bodies being received or held (HTTP and gRPC), against their budget: memory under a crowd of uploads.
        self.inflight_body_bytes = Gauge("segserve_inflight_body_bytes", "Bytes of request bodies being received or held now", registry=r)
        self.body_budget_bytes = Gauge("segserve_body_budget_bytes", "The budget of request-body bytes in flight (max_inflight_body_bytes)", registry=r)
        self.image_pixels = Histogram("segserve_image_pixels", "Decoded image size in pixels", buckets=PIXEL_BUCKETS, registry=r)
        self.rejected = Counter("segserve_rejected_total", "Requests refused before inference", ["reason"], registry=r)
        # What was done to each image: run at its own size (native) or scaled (fit), whole or in tiles.
        self.images = Counter("segserve_images_total", "Images segmented, by scale policy and whether they ran in tiles", ["model", "policy", "tiled"], registry=r)
        self.tiles = Counter("segserve_tiles_total", "Tiles run for images larger than one tile", ["model"], registry=r)
        # Batches as they run: how full, and how much of what they computed was padding.
        self.batch_size = Histogram("segserve_batch_size", "Images per session.run", ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.batch_pixels = Counter("segserve_batch_pixels_total", "Pixels computed by session.run, padding included", ["model"], registry=r)
        self.padding_pixels = Counter("segserve_padding_pixels_total", "Pixels computed by session.run that were padding", ["model"], registry=r)
        self.load_failures = Gauge("segserve_model_load_failures", "Model versions in the repository that failed to load (1 each)", ["model", "version"], registry=r)
        self.model_info = Gauge("segserve_model_info", "Loaded models (variant: the arithmetic that serves, int8/float32/float16)", ["model", "version", "provider", "architecture", "variant"], registry=r)
        self.variant_seconds = Gauge("segserve_variant_seconds", "Median seconds of each variant over the warm-up shapes, as timed at load to choose the one that serves", ["model", "version", "variant"], registry=r)
        # The gate and drift (runtime/gate.py, telemetry/drift.py).
        self.serving_version = Gauge("segserve_serving_version", "The version answering requests that name none (pinned or the newest that passed the gate)", ["model"], registry=r)
        self.checkset_mean_iu = Gauge("segserve_checkset_mean_iu", "Mean IU of a loaded or refused version on its model's check set", ["model", "version"], registry=r)
        self.gate_decisions = Counter("segserve_gate_decisions_total", "Versions the check-set gate let serve (promoted) or refused", ["model", "outcome"], registry=r)
        self.predicted_pixels = Counter("segserve_predicted_pixels_total", "Pixels predicted as each class", ["model", "version", "class"], registry=r)
        self.dominant_images = Counter("segserve_dominant_class_images_total", "Images by the class with the most pixels in them", ["model", "version", "class"], registry=r)
        self.shadow_requests = Counter("segserve_shadow_requests_total", "Live requests a candidate version answered in the shadow (ok, error) or passed over (skipped: busy, no pixel budget, refused)", ["model", "version", "outcome"], registry=r)
        self.shadow_agreement = Gauge("segserve_shadow_agreement", "Mean IU of a candidate's shadow answers against the served answers, so far", ["model", "version"], registry=r)
        self.shadow_duration = Histogram("segserve_shadow_duration_seconds", "Seconds a shadow run took, queue included", ["model", "version"], buckets=LATENCY_BUCKETS, registry=r)
        self.class_mix_drift = Gauge("segserve_class_mix_drift", "Total variation distance between the class mix of the last images and the check set's, as this version predicts them (0 same, 1 disjoint)", ["model", "version"], registry=r)
        # fmt: on

    def follow(self, read: Callable[[], Iterable[tuple[str, SaturationReading]]]) -> None:
        """Report the saturation of the models `read` lists at every scrape."""
        self.registry.register(SaturationCollector(read))

    def observe_stages(self, timings: Timings, model: str) -> None:
        """A finished request's stage times into segserve_stage_duration_seconds."""
        for stage, seconds in timings.seconds.items():
            self.stage_duration.labels(model, stage.value).observe(seconds)
