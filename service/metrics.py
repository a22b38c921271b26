"""Prometheus metrics, with the names of DESIGN.md, in a registry of the app's own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "segserve_requests_total", "Requests answered", ["model", "route", "status"], registry=r
        )
        self.request_duration = Histogram(
            "segserve_request_duration_seconds",
            "Time from request to response",
            ["model", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_duration = Histogram(
            "segserve_stage_duration_seconds",
            "Time per pipeline stage",
            ["model", "stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "segserve_batch_size",
            "Requests per session.run",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "segserve_queue_depth", "Requests waiting for a batch", ["model"], registry=r
        )
        self.inflight = Gauge("segserve_inflight_requests", "Requests being handled", registry=r)
        self.image_pixels = Histogram(
            "segserve_image_pixels",
            "Decoded image size in pixels",
            buckets=PIXEL_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            "segserve_rejected_total", "Requests refused before inference", ["reason"], registry=r
        )
        self.load_failures = Gauge(
            "segserve_model_load_failures",
            "Model versions in the repository that failed to load (1 each)",
            ["model", "version"],
            registry=r,
        )
        self.model_info = Gauge(
            "segserve_model_info",
            "Loaded models",
            ["model", "version", "provider", "architecture"],
            registry=r,
        )
