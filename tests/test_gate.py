"""The check-set gate (service/runtime/gate.py with the registry): a version that loads and
runs but can no longer say one class is refused while the serving version goes on serving;
an unchanged copy is promoted; a pin rolls back at once and every version stays loaded to go
back to; versions of a model without a check set go live ungated. The broken version is the
shipped model with its classifier's bias for "ring" at -1000, as the issue measured."""

import asyncio
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from PIL import Image
from prometheus_client import generate_latest

from helpers import metric_samples
from segserve.contracts.repository import MODEL_FILE, variant_paths
from segserve.default_model import NAME, install
from segserve.service.errors import ServiceError
from segserve.service.runtime.gate import PIN_FILE, Scores, judge
from segserve.service.runtime.registry import ModelRegistry
from segserve.service.settings import Settings
from segserve.service.telemetry.prometheus import ServiceMetrics

CLASSES = ["background", "a", "b"]


def scores(mean_iu, per_class):
    return Scores(10, mean_iu, per_class, [1 / 3] * 3)


def test_a_version_within_the_tolerance_passes_and_one_under_it_is_refused():
    serving = scores(0.95, [0.99, 0.93, 0.93])
    assert judge(scores(0.945, [0.99, 0.92, 0.925]), serving, 0.01, None, CLASSES).passed
    verdict = judge(scores(0.80, [0.99, 0.0, 0.93]), serving, 0.01, None, CLASSES)
    assert not verdict.passed and "0.8000" in verdict.reason and "0.9500" in verdict.reason


def test_a_class_under_the_floor_is_refused_even_when_the_mean_holds():
    verdict = judge(scores(0.95, [0.99, 0.40, 0.93]), None, 0.01, 0.5, CLASSES)
    assert not verdict.passed and "a 0.400" in verdict.reason
    assert judge(scores(0.95, [0.99, None, 0.93]), None, 0.01, 0.5, CLASSES).passed  # absent


def broken_copy(source, target):
    """The model with its classifier's bias for class 2 ("ring") at -1000: it loads, warms
    and answers, and never says ring."""
    model = onnx.load(str(source / MODEL_FILE))
    for init in model.graph.initializer:
        if init.name == "net.classifier.bias":
            bias = numpy_helper.to_array(init).copy()
            bias[2] = -1000.0
            init.CopyFrom(numpy_helper.from_array(bias, init.name))
    target.mkdir()
    onnx.save(model, str(target / MODEL_FILE))


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "repo"
    folder = install(root)
    for path in variant_paths(folder).values():
        path.unlink()  # float32 only: the gate is what is under test
    return root


def registry(repo):
    settings = Settings(
        repository=repo, warmup_shapes="64x64", intra_op_threads=2, repository_poll_s=0
    )
    return ModelRegistry(settings, ServiceMetrics())


def test_a_broken_version_is_refused_a_copy_serves_and_a_pin_rolls_back_to_a_loaded_one(repo):
    """The issue's story in one registry: v1 (the shipped model, scored on the check set
    `segserve init` wrote), v2 that cannot say "ring" (refused, v1 serves on), v3 an
    unchanged copy (serves), then a pin back to v1 (the very session loaded before) and
    the pin removed (v3 again)."""
    models = registry(repo)
    versions = repo / NAME

    async def main():
        await models.start()
        try:
            first = models.states(NAME)
            broken_copy(versions / "1", versions / "2")
            await models.sync()
            after_broken = models.get(NAME).version, models.states(NAME)
            with pytest.raises(ServiceError, match="refused by the check-set gate"):
                models.get(NAME, 2)
            shutil.copytree(versions / "1", versions / "3")
            await models.sync()
            after_copy = models.get(NAME).version, models.states(NAME)
            loaded_v1 = models.get(NAME, 1)
            (versions / PIN_FILE).write_text("1\n")
            await models.sync()
            pinned = models.get(NAME), models.states(NAME)
            (versions / PIN_FILE).unlink()
            await models.sync()
            return first, after_broken, after_copy, loaded_v1, pinned, models.get(NAME).version
        finally:
            await models.stop()

    first, (serving, states), (promoted, later), v1, (pinned, pin_states), unpinned = asyncio.run(
        main()
    )
    (state,) = first
    assert state["state"] == "serving" and state["scores"]["images"] == 40
    assert state["scores"]["mean_iu"] > 0.9 and min(state["scores"]["per_class_iu"]) > 0.8
    assert serving == 1
    by_version = {s["version"]: s for s in states}
    assert by_version[1]["state"] == "serving" and by_version[2]["state"] == "refused"
    broken = by_version[2]["scores"]
    assert broken["per_class_iu"][2] == 0.0
    assert broken["mean_iu"] < by_version[1]["scores"]["mean_iu"] - 0.05
    assert "under the serving version's" in by_version[2]["reason"]
    assert promoted == 3
    assert [(s["version"], s["state"]) for s in later] == [
        (1, "loaded"),
        (2, "refused"),
        (3, "serving"),
    ]
    assert pinned is v1  # going back costs no load
    assert [(s["version"], s["state"]) for s in pin_states] == [
        (1, "pinned"),
        (2, "refused"),
        (3, "loaded"),
    ]
    assert unpinned == 3
    samples = metric_samples(generate_latest(models.metrics.registry).decode())
    decisions = {s.labels["outcome"]: s.value for s in samples["segserve_gate_decisions_total"]}
    assert decisions == {"promoted": 2.0, "refused": 1.0}  # v1 (the first) and v3; v2
    ious = {s.labels["version"]: s.value for s in samples["segserve_checkset_mean_iu"]}
    assert set(ious) == {"1", "2", "3"} and ious["2"] < ious["1"] == ious["3"]
    assert [s.value for s in samples["segserve_serving_version"]] == [3.0]


def served_and_states(models, name):
    """Start, read what serves and every version's state, stop."""

    async def main():
        await models.start()
        try:
            return models.get(name).version, models.states(name)
        finally:
            await models.stop()

    return asyncio.run(main())


def test_without_a_check_set_versions_go_live_ungated(tiny_repository):
    models = registry(tiny_repository)
    version, states = served_and_states(models, "tiny")
    assert version == 2 and all(s["scores"] is None for s in states)
    assert {s["reason"] for s in states} == {"ungated: the model has no check set"}
    assert models.gate.check_set("tiny") is None


def test_a_check_set_that_does_not_fit_the_model_lets_its_versions_serve_ungated(
    tiny_repository, tmp_path
):
    """Labels with class ids the model lacks are the check set's fault: refusing every
    version would take the model down for a folder's mistake."""
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repository, repo)
    check = repo / "tiny" / "checkset"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (check / sub).mkdir(parents=True)
    Image.new("RGB", (40, 30), (90, 120, 40)).save(check / "JPEGImages" / "a.jpg")
    Image.fromarray(np.full((30, 40), 8, np.uint8)).save(check / "SegmentationClass" / "a.png")
    (check / "ImageSets" / "Segmentation" / "val.txt").write_text("a\n")
    models = registry(repo)
    version, states = served_and_states(models, "tiny")
    assert version == 2 and [s["state"] for s in states] == ["loaded", "serving"]
