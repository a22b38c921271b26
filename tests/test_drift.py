"""Drift without labels (telemetry/drift.py, counted by the registry for every answer):
the class mix of recent answers against what the version predicted on its check set.
Replaying the check set scores near 0; images of one class only score far above the shipped
alert's threshold; the counters move with traffic."""

import io

import numpy as np
import pytest
import yaml
from PIL import Image

from helpers import ROOT, in_process, metric_samples
from segserve.default_model import NAME, install
from segserve.service.telemetry.drift import DriftWindow, total_variation

THRESHOLD = 0.15  # docker/prometheus/rules.yml, SegserveClassMixDrift


def test_total_variation_is_zero_for_the_same_mix_and_one_for_disjoint_ones():
    assert total_variation([0.5, 0.5, 0], [0.5, 0.5, 0]) == 0
    assert total_variation([1, 0, 0], [0, 0.5, 0.5]) == 1
    window = DriftWindow(2, [0.8, 0.2])
    assert window.score() is None  # no image yet
    for counts in ([10, 0], [0, 10], [8, 2]):  # the first falls out of a window of two
        window.observe(np.array(counts))
    assert window.score() == pytest.approx(total_variation([0.4, 0.6], [0.8, 0.2]))
    assert DriftWindow(5, None).score() is None  # no check set, no reference


def test_the_shipped_alert_uses_the_threshold_measured_here():
    groups = yaml.safe_load((ROOT / "docker" / "prometheus" / "rules.yml").read_text())["groups"]
    rule = next(r for g in groups for r in g["rules"] if r.get("alert") == "SegserveClassMixDrift")
    assert f"segserve_class_mix_drift > {THRESHOLD}" in rule["expr"]


def jpeg(rgb: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, "JPEG", quality=92)
    return out.getvalue()


def drift_of(app) -> float:
    (sample,) = metric_samples(app.get("/metrics").text)["segserve_class_mix_drift"]
    return sample.value


def test_replaying_the_check_set_stays_under_the_alert_and_one_class_only_rises_over_it(
    tmp_path,
):
    install(tmp_path)
    check = sorted((tmp_path / NAME / "checkset" / "JPEGImages").glob("*.jpg"))
    with in_process(tmp_path, drift_window=20, variant="float32") as app:
        for path in check[:20]:
            r = app.post(
                "/segment", content=path.read_bytes(), headers={"Content-Type": "image/jpeg"}
            )
            assert r.status_code == 200
        replayed = drift_of(app)
        rng = np.random.default_rng(0)
        for _ in range(20):  # flat colours: the model calls them background, nothing else
            flat = np.full((160, 160, 3), rng.integers(0, 256, 3), np.uint8)
            app.post("/segment", content=jpeg(flat), headers={"Content-Type": "image/jpeg"})
        one_class = drift_of(app)
        samples = metric_samples(app.get("/metrics").text)
    assert replayed < THRESHOLD / 2 < THRESHOLD < one_class
    dominant = {s.labels["class"]: s.value for s in samples["segserve_dominant_class_images_total"]}
    assert sum(dominant.values()) == 40 and dominant["background"] >= 20
    pixels = {s.labels["class"]: s.value for s in samples["segserve_predicted_pixels_total"]}
    assert pixels["background"] >= 20 * 160 * 160 and len(pixels) >= 5  # the replay's classes
