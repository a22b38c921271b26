"""The Prometheus metrics on their own: names and help as docs/design.md gives them, the
stage histogram a request's clock feeds, and the saturation gauges read at each scrape."""

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from segserve.service.batching.batcher import Saturation
from segserve.service.telemetry.clock import Stage, Timings
from segserve.service.telemetry.prometheus import ServiceMetrics


def test_timings_feed_the_stage_histogram_with_the_model_label():
    metrics = ServiceMetrics()
    timings = Timings()
    timings.add(Stage.ENCODE, 0.003)
    metrics.observe_stages(timings, "m")
    text = generate_latest(metrics.registry).decode()
    (count,) = [
        s
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "segserve_stage_duration_seconds_count"
    ]
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
    value = {
        f: found[f].samples[0].value
        for f in found
        if f.startswith("segserve_")
        and found[f].samples
        and found[f].samples[0].labels == {"model": "m"}
    }
    assert value["segserve_queue_depth"] == 3 and value["segserve_queued_pixels"] == 2100
    assert value["segserve_running_pixels"] == 500
    assert value["segserve_batch_capacity_pixels"] == 16000
    assert value["segserve_predicted_wait_seconds"] == 0.9  # the longer of the two
    assert value["segserve_oldest_wait_seconds"] == 1.5
    assert found["segserve_queue_depth"].documentation == "Images waiting for a batch"
    now.clear()  # no model: the families stay, without samples
    assert families(metrics)["segserve_queue_depth"].samples == []
