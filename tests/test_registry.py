"""The served models' lifecycle, driven directly (no HTTP): loading and warming every version,
the newest serving by default, failed versions listed and retried when their file changes,
versions retired when they leave the repository, readiness and its reasons."""

import asyncio
import os
import shutil

import pytest

from segserve.service.errors import ServiceError
from segserve.service.runtime.registry import ModelRegistry
from segserve.service.settings import Settings
from segserve.service.telemetry.prometheus import ServiceMetrics
from segserve.service.telemetry.tracing import Tracing


def registry(repository, **settings) -> ModelRegistry:
    values = {"warmup_shapes": "32x32", "intra_op_threads": 1, "repository_poll_s": 0}
    return ModelRegistry(
        Settings(repository=repository, **{**values, **settings}), ServiceMetrics()
    )


@pytest.fixture
def repo(tiny_repository, tmp_path):
    target = tmp_path / "repo"
    shutil.copytree(tiny_repository, target)
    return target


def test_every_version_is_loaded_and_warm_before_serving_and_the_newest_is_the_default(repo):
    async def main():
        models = registry(repo)
        assert models.unready_reason() == "starting or shutting down"
        await models.start()
        try:
            return models, models.get(None), models.get("tiny", 1), models.unready_reason()
        finally:
            await models.stop()

    models, default, first, reason = asyncio.run(main())
    assert (default.name, default.version, first.version) == ("tiny", 2, 1)
    assert default.warmed and first.warmed and reason == ""
    assert models.names == ["tiny"] and models.versions("tiny") == [1, 2]
    assert models.unready_reason() == "starting or shutting down"  # stopped


def test_unknown_models_and_versions_are_404s_that_say_what_is_loaded(repo):
    async def main():
        models = registry(repo)
        await models.start()
        await models.stop()
        return models

    models = asyncio.run(main())
    with pytest.raises(ServiceError, match="unknown model 'nope'; loaded: tiny") as caught:
        models.get("nope")
    assert caught.value.status == 404
    with pytest.raises(ServiceError, match=r"no version 7; it has \[1, 2\]"):
        models.get("tiny", 7)


def test_a_version_that_fails_is_listed_retried_when_its_file_changes_and_never_fatal(repo):
    broken = repo / "tiny" / "3" / "model.onnx"
    broken.parent.mkdir()
    broken.write_bytes(b"not an onnx file")

    async def main():
        models = registry(repo)
        await models.start()
        failed = [(f.name, f.version) for f in models.failed]
        newest_while_broken = models.get("tiny").version
        await models.sync()  # the same file: not tried again
        shutil.copyfile(repo / "tiny" / "2" / "model.onnx", broken)
        os.utime(broken, (1, 1))  # a changed file (mtime) is tried again
        await models.sync()
        try:
            return failed, newest_while_broken, models.failed, models.get("tiny").version
        finally:
            await models.stop()

    failed, newest_while_broken, failed_after, newest_after = asyncio.run(main())
    assert failed == [("tiny", 3)] and newest_while_broken == 2
    assert failed_after == [] and newest_after == 3


def test_a_version_removed_from_the_repository_is_retired(repo):
    async def main():
        models = registry(repo)
        await models.start()
        v2 = models.get("tiny", 2)
        shutil.rmtree(repo / "tiny" / "2")
        await models.sync()
        await asyncio.wait_for(v2.batcher.stop(), 10)  # retirement drains it; stopping is prompt
        try:
            return models.versions("tiny"), models.get("tiny").version
        finally:
            await models.stop()

    assert asyncio.run(main()) == ([1], 1)


def test_readiness_waits_for_the_default_and_every_required_model(repo, tmp_path):
    async def reasons(repository, **settings):
        models = registry(repository, **settings)
        await models.start()
        await models.stop()
        models.serving = True  # as between start and stop
        return models.unready_reason()

    assert asyncio.run(reasons(repo, required_models="other")) == (
        "required models not loaded: other"
    )
    assert asyncio.run(reasons(repo, default_model="other")) == "required models not loaded: other"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert asyncio.run(reasons(empty)) == "no model is loaded"


def test_a_batch_run_adds_its_stages_to_each_request_once_and_counts_the_batch():
    """Two images of one request in one run: stacking and inference count once for the
    request (not once per image); its queue wait is the longest of its images'."""
    import asyncio as aio

    from segserve.service.batching.batcher import BatchRun, Job
    from segserve.service.runtime.registry import record_batch
    from segserve.service.telemetry.clock import Stage, Timings

    metrics, timings, other = ServiceMetrics(), Timings(), Timings()
    loop = aio.new_event_loop()
    jobs = [
        Job(None, (32, 32), 1e9, loop.create_future(), enqueued, clock)
        for enqueued, clock in ((10.0, timings), (11.0, timings), (11.5, other))
    ]
    loop.close()
    record_batch(
        metrics, "m", Tracing(), 1, "float32", BatchRun(jobs, 12.0, 0.25, 0.5, 4 * 32 * 32)
    )
    assert timings.seconds == {Stage.QUEUE: 2.0, Stage.PREPROCESS: 0.25, Stage.INFERENCE: 0.5}
    assert other.seconds == {Stage.QUEUE: 0.5, Stage.PREPROCESS: 0.25, Stage.INFERENCE: 0.5}
    sample = metrics.registry.get_sample_value
    assert sample("segserve_batch_size_count", {"model": "m"}) == 1
    assert sample("segserve_padding_pixels_total", {"model": "m"}) == 32 * 32
    record_batch(
        metrics,
        "m",
        Tracing(),
        1,
        "float32",
        BatchRun(jobs[:1], 13.0, 0.0, 0.1, 32 * 32, failed=True),
    )
    assert sample("segserve_batch_size_count", {"model": "m"}) == 1  # a failed run: no batch
    assert Stage.INFERENCE in timings.seconds and timings.seconds[Stage.INFERENCE] == 0.5


def test_a_model_that_runs_large_images_in_tiles_is_warmed_and_timed_at_its_tile_too(repo):
    async def main():
        models = registry(repo, tile_size=400)
        await models.start()
        try:
            model = models.get("tiny")
            return models.warm_shapes(model.engine), model.card, list(model.batcher.cost._runs)
        finally:
            await models.stop()

    shapes, card, runs = asyncio.run(main())
    assert card.scale_policy == "native"  # exported: segserve's networks run native
    side = shapes[-1][0]
    assert shapes == [(32, 32), (side, side)] and 400 - card.size_divisor < side <= 400
    # The timed runs: the warm-up shape, a shape never seen, a batch of the warm-up shape
    # (as the batcher forms them) and the tile (its second run).
    timed = {p for p, _ in runs}
    assert {32 * 32, side * side} <= timed and len(timed) >= 3
