"""The served models' lifecycle, driven directly (no HTTP): loading and warming every version,
the newest serving by default, failed versions listed and retried when their file changes,
versions retired when they leave the repository, readiness and its reasons."""

import asyncio
import os
import shutil

import pytest

from segserve.service.errors import ServiceError
from segserve.service.metrics import ServiceMetrics
from segserve.service.registry import ModelRegistry
from segserve.service.settings import Settings


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
