"""What the service measures, on its own: the stage names, one request's clock, and the
Prometheus metrics those timings feed (names and help as DESIGN.md gives them)."""

import time

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from segserve.service.metrics import JSON_STAGES, Saturation, ServiceMetrics, Stage, Timings


def test_the_stages_are_named_once_in_request_order():
    assert [s.value for s in Stage] == [
        "decode", "preprocess", "queue", "inference", "postprocess", "encode",
    ]  # fmt: skip
    assert set(JSON_STAGES) < set(Stage)


def test_a_request_has_one_clock_for_its_deadline_its_stages_and_its_total():
    timings = Timings(timeout_s=5.0, arrived=time.monotonic() - 1.0)
    assert timings.deadline == timings.arrived + 5.0
    assert 3.9 < timings.left() <= 4.0 and 1.0 <= timings.elapsed() < 1.1
    with timings.stage(Stage.DECODE):
        pass
    timings.add(Stage.INFERENCE, 0.25)
    timings.add(Stage.INFERENCE, 0.25)  # measured in two pieces: they add up
    timings.longest(Stage.QUEUE, 0.5)
    timings.longest(Stage.QUEUE, 0.1)  # several images: the longest wait counts
    ms = timings.milliseconds()
    assert list(ms) == ["decode", "queue", "inference", "total"]  # stage order, then total
    assert ms["inference"] == 500.0 and ms["queue"] == 500.0 and ms["total"] >= 1000.0
    assert timings.server_timing().startswith("decode;dur=")
    assert "inference;dur=500.00" in timings.server_timing()


def test_timings_feed_the_stage_histogram_with_the_model_label():
    metrics = ServiceMetrics()
    timings = Timings()
    timings.add(Stage.ENCODE, 0.003)
    timings.observe(metrics, "m")
    text = generate_latest(metrics.registry).decode()
    (count,) = [
        s for f in text_string_to_metric_families(text) for s in f.samples
        if s.name == "segserve_stage_duration_seconds_count"
    ]  # fmt: skip
    assert count.labels == {"model": "m", "stage": "encode"} and count.value == 1


def families(metrics: ServiceMetrics) -> dict:
    text = generate_latest(metrics.registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_metric_help_says_what_is_counted():
    found = families(ServiceMetrics())
    assert found["segserve_batch_size"].documentation == "Images per session.run"
    assert "padding" in found["segserve_padding_pixels"].documentation


def test_saturation_is_read_at_each_scrape_and_two_versions_of_a_name_add_up():
    now = {
        "v1": Saturation(2, 2000, 500, 8000, 0.4, 1.5),
        "v2": Saturation(1, 100, 0, 8000, 0.9, 0.2),
    }
    metrics = ServiceMetrics()
    metrics.follow(lambda: [("m", s) for s in now.values()])
    found = families(metrics)
    value = {f: found[f].samples[0].value for f in found if f.startswith("segserve_")
             and found[f].samples and found[f].samples[0].labels == {"model": "m"}}  # fmt: skip
    assert value["segserve_queue_depth"] == 3 and value["segserve_queued_pixels"] == 2100
    assert value["segserve_running_pixels"] == 500
    assert value["segserve_batch_capacity_pixels"] == 16000
    assert value["segserve_predicted_wait_seconds"] == 0.9  # the longer of the two
    assert value["segserve_oldest_wait_seconds"] == 1.5
    assert found["segserve_queue_depth"].documentation == "Images waiting for a batch"
    now.clear()  # no model: the families stay, without samples
    assert families(metrics)["segserve_queue_depth"].samples == []
