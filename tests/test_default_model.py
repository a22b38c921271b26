"""The default model that ships with the project (segserve/default_model): installed into an
empty repository by `segserve init`, it says where it came from, and served over HTTP it
segments images of its own distribution drawn from a seed no training run used: mean IU at
least 0.80 and no class painted along the image borders over background."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from helpers import in_process
from segserve.cli import main
from segserve.default_model import FILES, NAME, VERSION, install
from segserve.training.synth import DEFAULT_MODEL_SET, SYNTH_CLASSES, SynthConfig
from segserve.training.synth_score import score_segmenter

FRESH_SEED = 4242  # the default model trained on seed 0; the web page's samples are 20150607
IMAGES = 60


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    assert main(["init", "--repository", str(root)]) == 0
    return root


def test_the_shipped_model_is_small_and_installs_only_into_an_empty_repository(repository):
    assert (FILES / "model.onnx").stat().st_size <= 10 * 1024 * 1024
    folder = repository / NAME / str(VERSION)
    assert (folder / "model.onnx").read_bytes() == (FILES / "model.onnx").read_bytes()
    assert install(repository) is None  # a repository with a model is left as it is


def test_its_card_says_how_it_was_made_and_how_well_it_scores(repository):
    card = json.loads((repository / NAME / str(VERSION) / "model.json").read_text())
    provenance = card["provenance"]
    assert {"commit", "command", "device", "arithmetic", "train_seconds"} <= set(provenance)
    assert provenance["command"].startswith("segserve ")
    assert card["metrics"]["mean_iu"] >= 0.85
    per_class = card["metrics"]["per_class_iu"]
    assert list(per_class) == list(SYNTH_CLASSES) and min(per_class.values()) >= 0.70


def test_served_over_http_it_segments_fresh_images_well_and_leaves_borders_alone(repository):
    with in_process(repository) as app:
        assert app.get(f"/models/{NAME}").json()["card"]["provenance"]["commit"]

        def segment(jpeg: bytes) -> np.ndarray:
            r = app.post("/segment", content=jpeg, headers={"Content-Type": "image/jpeg"})
            assert r.status_code == 200
            return np.asarray(Image.open(io.BytesIO(r.content)))

        scores = score_segmenter(
            segment, SynthConfig(count=IMAGES, seed=FRESH_SEED, **DEFAULT_MODEL_SET)
        )
    assert scores["mean_iu"] >= 0.80, scores
    assert scores["border_background_wrong"] <= 0.01, scores
