"""Which variant serves (service/runtime/variants.py and the registry): measured on this
machine in alternating rounds, another variant only where clearly faster, a setting that
forces one, and a variant that appears beside a served version taking over without a
restart. Run on the tiny model with an int8 variant made for it; both outcomes of `auto`
are checked on made-up timings, since which one this CPU gives depends on the CPU."""

import asyncio
import shutil

import pytest

from segserve.contracts.repository import variant_paths
from segserve.export.quantize import quantize_version
from segserve.service.runtime.registry import ModelRegistry
from segserve.service.runtime.variants import CLEARLY_FASTER, candidates, choose, time_rounds
from segserve.service.settings import Settings
from segserve.service.telemetry.prometheus import ServiceMetrics


def test_another_variant_serves_only_where_it_is_clearly_faster():
    assert choose({"float32": 1.0, "int8": 0.5}, "float32")[0] == "int8"
    assert choose({"float32": 1.0, "int8": 1 / CLEARLY_FASTER}, "float32")[0] == "int8"
    variant, reason = choose({"float32": 1.0, "int8": 0.95}, "float32")
    assert variant == "float32" and "1/1.05" in reason and "under the 1/1.10" in reason
    assert choose({"float32": 1.0, "int8": 1.2}, "float32") == ("float32", "float32 was fastest")


def test_each_provider_times_only_the_variants_it_runs_well_and_a_forced_one_must_exist():
    files = {"int8": "model.int8.onnx", "float16": "model.float16.onnx"}
    assert candidates("float32", files, "cpu", "auto") == (["int8"], None)
    assert candidates("float32", files, "cuda", "auto") == (["float16"], None)
    assert candidates("float32", {}, "cpu", "auto") == ([], None)
    assert candidates("float32", files, "cpu", "float32") == ([], None)
    assert candidates("float32", files, "cuda", "int8") == (["int8"], None)
    wanted, why = candidates("float32", {}, "cpu", "int8")
    assert wanted == [] and why == "no int8 variant in this version: serving its own float32"


def test_rounds_alternate_between_variants_and_the_median_round_counts():
    order, ticks = [], iter(range(1000))
    costs = {"a": [5, 1, 1], "b": [2, 2, 9]}  # a slow first round of a, a slow last of b
    rounds = {"a": iter(costs["a"]), "b": iter(costs["b"])}
    now = [0.0]

    def clock():
        next(ticks)
        return now[0]

    def runner(name):
        def run(_image):
            order.append(name)
            now[0] += next(rounds[name])

        return run

    seconds, runs = time_rounds({"a": runner("a"), "b": runner("b")}, [(8, 8)], 3, clock)
    assert order == ["a", "b", "a", "b", "a", "b"]
    assert seconds == {"a": 1.0, "b": 2.0}  # the medians: one bad round does not decide
    assert runs["a"] == [(64, 5.0), (64, 1.0), (64, 1.0)]


@pytest.fixture(scope="module")
def with_int8(tiny_repository, synth_root, tmp_path_factory):
    """The tiny repository with an int8 variant beside tiny v2 (calibrated on the synthetic
    images as a plain folder: its labels have more classes than tiny)."""
    repo = tmp_path_factory.mktemp("variants") / "repo"
    shutil.copytree(tiny_repository, repo)
    photos = tmp_path_factory.mktemp("photos")
    for path in (synth_root / "JPEGImages").glob("*.jpg"):
        shutil.copy(path, photos)
    quantize_version(repo, "tiny", 2, photos, calibration=8, held_out=4, log=lambda *_: None)
    return repo


def serve(repository, body, **settings):
    values = {"warmup_shapes": "32x32,48x64", "intra_op_threads": 1, "repository_poll_s": 0}
    registry = ModelRegistry(
        Settings(repository=repository, **{**values, **settings}), ServiceMetrics()
    )

    async def main():
        await registry.start()
        try:
            return await body(registry)
        finally:
            await registry.stop()

    return asyncio.run(main())


async def current(registry):
    return registry.get("tiny")


def test_auto_times_both_variants_here_and_serves_what_the_measurement_says(with_int8):
    model = serve(with_int8, current)
    c = model.choice
    assert set(c.seconds) == {"float32", "int8"} and c.rounds == 3 and c.mode == "auto"
    assert model.variant == choose(c.seconds, "float32")[0] == c.variant
    assert model.card.precision == model.variant and model.variants == ["float32", "int8"]
    assert model.batcher.cost.per_pixel > 0  # seeded from the timed runs of what serves


@pytest.mark.parametrize("forced", ["float32", "int8"])
def test_the_setting_forces_a_variant_and_only_that_one_is_loaded(with_int8, forced):
    model = serve(with_int8, current, variant=forced)
    assert model.variant == forced and model.choice.mode == forced
    assert set(model.choice.seconds) == {forced}  # nothing else was loaded or timed
    assert model.choice.reason == f"variant={forced} (the setting)"


def test_forcing_a_variant_a_version_lacks_serves_its_own_and_says_so(tiny_repository):
    model = serve(tiny_repository, current, variant="int8")
    assert model.variant == "float32"
    assert model.choice.reason == "no int8 variant in this version: serving its own float32"


def test_a_variant_added_beside_a_served_version_takes_over_without_a_restart(with_int8, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(with_int8, repo)
    int8 = variant_paths(repo / "tiny" / "2")["int8"]
    kept = int8.rename(tmp_path / "model.int8.onnx")

    async def body(registry):
        before = registry.get("tiny")
        kept.rename(int8)  # as `segserve quantize` publishes it: one rename
        await registry.sync()
        after = registry.get("tiny")
        return before, after

    before, after = serve(repo, body, variant="int8")
    assert before.variant == "float32" and "no int8 variant" in before.choice.reason
    assert after is not before and after.variant == "int8"
