"""Which engine serves a version, chosen for real on this machine (service/runtime/
selection.py): every candidate runtime x arithmetic loaded, timed and, before it may serve,
checked against float32 on the check set here; stale, damaged and perturbed variants never
answer; OpenVINO's arithmetics where this CPU has them (the skips say which it lacks).

Run on the shipped model (trained: its int8 file and OpenVINO's arithmetics agree with its
float32 as a real network's do) with 6 images of the check set `segserve init` writes.
Which candidate a CPU makes fastest is the CPU's business: the tests assert what holds on
every kind (verdicts that match the timings and the checks), never which one wins."""

from __future__ import annotations

import asyncio
import io
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from PIL import Image

from segserve.contracts.card import ModelCard
from segserve.contracts.repository import MODEL_FILE, set_card, variant_path, variant_paths
from segserve.default_model import NAME, install
from segserve.service.runtime import openvino
from segserve.service.runtime.gate import load_check_set
from segserve.service.runtime.providers import ProviderUnavailable
from segserve.service.runtime.registry import ModelRegistry
from segserve.service.runtime.selection import select_variant
from segserve.service.runtime.variants import CLEARLY_FASTER
from segserve.service.settings import Settings
from segserve.service.telemetry.prometheus import ServiceMetrics

CHECK_IMAGES = 6


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """REPO/unet-shapes: version 1 as shipped (model.onnx, model.int8.onnx) and its check
    set cut to CHECK_IMAGES images."""
    repo = tmp_path_factory.mktemp("selection") / "repo"
    install(repo)
    ids = repo / NAME / "checkset" / "ImageSets" / "Segmentation" / "val.txt"
    ids.write_text("\n".join(ids.read_text().split()[:CHECK_IMAGES]) + "\n")
    return repo


def settings(repo, **values) -> Settings:
    base = {
        "warmup_shapes": "64x64,48x80",
        "intra_op_threads": 2,
        "variant": "auto",
        "variant_rounds": 2,
    }
    return Settings(repository=repo, repository_poll_s=0, **{**base, **values})


def select(repo, version=1, check=True, **values):
    folder = repo / NAME / str(version)
    check_set = load_check_set(repo / NAME) if check else None
    return select_variant(
        folder / MODEL_FILE, folder / "model.json", variant_paths(folder), settings(repo, **values),
        check_set,
    )  # fmt: skip


def reports(selection) -> dict[str, dict]:
    return {r["name"]: r for r in selection.choice.as_dict()["candidates"]}


@pytest.fixture(scope="module")
def auto(shipped):
    return select(shipped)


def test_auto_times_every_candidate_and_serves_the_fastest_clearly_faster_that_passes(auto):
    choice, found = auto.choice, reports(auto)
    seconds = choice.seconds
    assert list(found)[:2] == ["float32", "int8"] and "float32" in seconds
    assert [r["verdict"] for r in found.values()].count("serving") == 1
    assert found[choice.variant]["verdict"] == "serving" == found[auto.engine.variant]["verdict"]
    for name, r in found.items():
        assert r["verdict"] in ("serving", "slower", "refused", "unavailable"), r
        assert r["reason"] or name == "float32", r
        timed_once = r["reason"].endswith("(timed once)")  # hopeless after round 1
        if r["verdict"] == "slower" and choice.variant == "float32" and not timed_once:
            assert seconds[name] * CLEARLY_FASTER > seconds["float32"], (r, seconds)
    if choice.variant != "float32":  # clearly faster, and checked on the check set here
        assert seconds[choice.variant] * CLEARLY_FASTER <= seconds["float32"], seconds
        assert found[choice.variant]["agreement"] >= 0.995
        assert found[choice.variant]["reason"].startswith("checked: ")
        assert found["float32"]["mean_iu"] > 0.5  # the reference, scored on the check set
        assert auto.scores is not None and auto.scores.images == CHECK_IMAGES  # for the gate
    assert choice.as_dict()["round"] == ["64x64", "48x80", "74x78 (unseen)", "4 x 64x64"]


def test_openvino_s_candidates_are_listed_with_what_this_cpu_computes_natively(auto):
    found = reports(auto)
    if not openvino.installed():
        assert not any(n.startswith("openvino") for n in found)
        pytest.skip("OpenVINO is not installed (the openvino extra)")
    native = openvino.cpu_arithmetics()
    assert {"openvino-float32", "openvino-bf16", "openvino-int8"} <= set(found)
    assert found["openvino-float32"]["verdict"] != "unavailable"
    bf16 = found["openvino-bf16"]
    if "bf16" in native:
        assert bf16["verdict"] != "unavailable" and bf16["seconds"] > 0
    else:
        assert bf16["verdict"] == "unavailable" and "no native bf16" in bf16["reason"]
        assert bf16["seconds"] is None  # never compiled, never timed


@pytest.mark.parametrize("forced", ["int8", "openvino-float32", "openvino-int8"])
def test_a_forced_candidate_is_the_only_one_timed_and_is_still_checked(shipped, forced):
    if forced.startswith("openvino") and not openvino.installed():
        pytest.skip("OpenVINO is not installed (the openvino extra)")
    chosen = select(shipped, variant=forced, variant_rounds=1)
    assert chosen.engine.variant == chosen.choice.variant == forced
    assert set(chosen.choice.seconds) == {forced}
    assert chosen.choice.reason.startswith(f"variant={forced} (the setting); checked: ")
    found = reports(chosen)
    assert found[forced]["agreement"] >= 0.995
    assert {r["verdict"] for n, r in found.items() if n not in (forced, "float32")} <= {"skipped"}


@pytest.mark.skipif(
    "bf16" not in openvino.cpu_arithmetics(),
    reason="this CPU has no native bf16 (OpenVINO's CPU plugin lists "
    f"{sorted(openvino.cpu_arithmetics()) or 'nothing: OpenVINO not installed'}): "
    "openvino-bf16 runs where it has AVX512-BF16 or AMX",
)
def test_bf16_serves_where_the_cpu_computes_it_and_agrees_with_float32(shipped):
    chosen = select(shipped, variant="openvino-bf16", variant_rounds=1)
    assert chosen.engine.variant == "openvino-bf16"
    assert chosen.engine.runner.computes_in == "bf16"
    assert reports(chosen)["openvino-bf16"]["agreement"] >= 0.995


def test_an_arithmetic_this_cpu_lacks_is_never_served_pretending(shipped):
    if not openvino.installed():
        pytest.skip("OpenVINO is not installed (the openvino extra)")
    lacking = [a for a in ("bf16", "float16") if a not in openvino.cpu_arithmetics()]
    if not lacking:
        pytest.skip("this CPU computes bf16 and float16 natively")
    chosen = select(shipped, variant=f"openvino-{lacking[0]}", variant_rounds=1)
    assert chosen.engine.variant == "float32"
    assert f"is unavailable: this CPU has no native {lacking[0]}" in chosen.choice.reason


def test_without_a_check_set_only_float32_arithmetic_may_serve_and_the_reason_says_so(shipped):
    chosen = select(shipped, check=False, variant_rounds=1)
    found = reports(chosen)
    assert found["int8"]["verdict"] == "refused"
    assert found["int8"]["reason"] == "no check set: only float32 arithmetic may serve unchecked"
    assert found["int8"]["seconds"] is None  # not even loaded
    assert chosen.engine.variant in ("float32", "openvino-float32")
    forced = select(shipped, check=False, variant="int8", variant_rounds=1)
    assert forced.engine.variant == "float32"
    assert "variant=int8 (the setting) is refused: no check set" in forced.choice.reason


def new_version(repo, version, model: onnx.ModelProto | None = None):
    """REPO/unet-shapes/VERSION as a copy of version 1's folder (its variants too), with
    `model` as its model.onnx when given."""
    folder = repo / NAME / str(version)
    shutil.copytree(repo / NAME / "1", folder)
    if model is not None:
        onnx.save(model, str(folder / MODEL_FILE))
    return folder


def classifier_changed(folder, cls: int, bias: float) -> onnx.ModelProto:
    model = onnx.load(str(folder / MODEL_FILE))
    for init in model.graph.initializer:
        if init.name.endswith("classifier.bias"):
            value = numpy_helper.to_array(init).copy()
            value[cls] = bias
            init.CopyFrom(numpy_helper.from_array(value, init.name))
    return model


def test_a_variant_made_from_another_model_onnx_is_stale_and_never_runs(shipped, tmp_path):
    """The copied-folder case: a version folder copied and given a new model.onnx keeps
    the old int8 file beside it. That file is never run, on any runtime."""
    repo = tmp_path / "repo"
    shutil.copytree(shipped, repo)
    new_version(repo, 2, classifier_changed(repo / NAME / "1", 2, 0.25))
    chosen = select(repo, version=2)
    found = reports(chosen)
    for name in [n for n in found if n.endswith("int8")]:
        assert found[name]["verdict"] == "stale", found[name]
        assert found[name]["reason"].startswith("stale: made from another model.onnx (sha256 ")
    assert chosen.engine.path == repo / NAME / "2" / MODEL_FILE
    assert chosen.engine.variant in ("float32", "openvino-float32")


def test_a_variant_that_does_not_say_what_it_was_made_from_is_stale(shipped, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(shipped, repo)
    int8 = variant_path(repo / NAME / "1", "int8")
    model = onnx.load(str(int8))
    card = ModelCard.from_metadata({p.key: p.value for p in model.metadata_props})
    set_card(model, card.replace(source_sha256=""))
    onnx.save(model, str(int8))
    found = reports(select(repo, variant="int8", variant_rounds=1))
    assert found["int8"]["verdict"] == "stale"
    assert "does not record the model.onnx it was made from" in found["int8"]["reason"]


def test_a_perturbed_int8_file_is_refused_with_its_figures_and_float32_serves(shipped, tmp_path):
    """An int8 file made from this very model.onnx (its source checks out) whose weights
    were changed afterwards: it loads, runs and may well be fast; its labels give it away."""
    repo = tmp_path / "repo"
    shutil.copytree(shipped, repo)
    int8 = variant_path(repo / NAME / "1", "int8")
    model = onnx.load(str(int8))
    weights = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    middle = max(weights, key=lambda i: np.prod(i.dims))  # the largest int8 weight tensor
    noisy = np.random.default_rng(0).integers(-127, 128, tuple(middle.dims), dtype=np.int8)
    middle.CopyFrom(numpy_helper.from_array(noisy, middle.name))
    onnx.save(model, str(int8))
    chosen = select(repo, variant="int8", variant_rounds=1)
    assert chosen.engine.variant == "float32"
    found = reports(chosen)["int8"]
    assert found["verdict"] == "refused" and found["agreement"] < 0.995
    assert found["reason"].startswith("failed its check on the check set: ")
    assert f"{found['agreement']:.4%} of pixels keep float32's label" in found["reason"]
    assert "variant=int8 (the setting) is refused: failed its check" in chosen.choice.reason


def test_a_damaged_variant_costs_the_version_nothing(shipped, tmp_path):
    """A good model.onnx beside a truncated int8 file: the version serves, on what works."""
    repo = tmp_path / "repo"
    shutil.copytree(shipped, repo)
    int8 = variant_path(repo / NAME / "1", "int8")
    int8.write_bytes(int8.read_bytes()[: int8.stat().st_size // 2])
    chosen = select(repo, variant_rounds=1)
    found = reports(chosen)
    for name in [n for n in found if n.endswith("int8")]:
        assert found[name]["verdict"] == "refused"
        assert found[name]["reason"].startswith("does not load: ")
    assert chosen.engine.variant in ("float32", "openvino-float32")


def test_runtimes_limits_the_candidates_and_a_named_runtime_must_be_installed(shipped, monkeypatch):
    chosen = select(shipped, runtimes="onnxruntime", variant_rounds=1)
    assert list(reports(chosen)) == ["float32", "int8"]
    # Where OpenVINO is missing (faked here: this suite installs it), naming it fails the start.
    monkeypatch.setattr(openvino, "installed", lambda: False)
    with pytest.raises(ProviderUnavailable, match="pip install 'segserve\\[openvino\\]'"):
        select(shipped, runtimes="onnxruntime,openvino")
    assert list(reports(select(shipped, variant_rounds=1))) == ["float32", "int8"]  # auto


def serve(repository, body, **values):
    registry = ModelRegistry(settings(repository, **values), ServiceMetrics())

    async def main():
        await registry.start()
        try:
            return await body(registry)
        finally:
            await registry.stop()

    return asyncio.run(main())


def test_the_copied_folder_never_answers_as_the_new_version(shipped, tmp_path):
    """v2: v1's folder copied, its model.onnx replaced by one that cannot say "ring". Before
    variants knew their source, v1's int8 file passed the gate and answered as v2."""
    repo = tmp_path / "repo"
    shutil.copytree(shipped, repo)
    new_version(repo, 2, classifier_changed(repo / NAME / "1", 2, -1000.0))

    async def body(registry):
        return registry.versions(NAME), registry.states(NAME)

    versions, states = serve(repo, body, variant="int8", variant_rounds=1)
    assert versions == [1]
    refused = [s for s in states if s["version"] == 2]
    assert refused[0]["state"] == "refused" and "mean IU" in refused[0]["reason"]


def test_a_variant_added_beside_a_served_version_takes_over_without_a_restart(shipped, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(shipped, repo)
    int8 = variant_path(repo / NAME / "1", "int8")
    kept = int8.rename(tmp_path / "model.int8.onnx")

    async def body(registry):
        before = registry.get(NAME)
        kept.rename(int8)  # as `segserve quantize` publishes it: one rename
        await registry.sync()
        return before, registry.get(NAME)

    before, after = serve(repo, body, variant="int8", variant_rounds=1)
    assert before.variant == "float32" and "no such candidate" in before.choice.reason
    assert after is not before and after.variant == "int8"


def test_what_serves_answers_and_models_lists_every_candidate(shipped):
    from helpers import in_process

    with in_process(shipped, variant="auto", variant_rounds=1) as app:
        detail = app.get(f"/models/{NAME}").json()
        buf = io.BytesIO()
        Image.fromarray(np.zeros((60, 90, 3), np.uint8)).save(buf, "PNG")
        r = app.post("/segment", content=buf.getvalue(), headers={"Content-Type": "image/png"})
    choice = detail["variant_choice"]
    assert r.status_code == 200 and detail["variant"] == choice["variant"]
    names = [c["name"] for c in choice["candidates"]]
    assert names[:2] == ["float32", "int8"] and detail["variant"] in names
    for c in choice["candidates"]:
        assert {
            "runtime",
            "arithmetic",
            "file",
            "verdict",
            "reason",
            "seconds",
            "agreement",
        } <= set(c)
    assert set(choice["load_seconds"]) == {"timing", "checking"}
