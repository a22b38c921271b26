"""Rebuilding the default model: before it trains, `segserve bootstrap` says what that will
cost here (the arithmetic this CPU trains in, minutes from a short timed step of the
recipe's own shape); the recipe is the one the shipped model's card records."""

from __future__ import annotations

import json
import re

import torch

from segserve.cli import main
from segserve.default_model import FILES
from segserve.export.bootstrap import RECIPE, SYNTH
from segserve.training.train import autocast_dtype


def test_estimate_only_says_this_machine_s_arithmetic_and_minutes_and_trains_nothing(
    tmp_path, capsys, monkeypatch
):
    # Timed steps of 2 crops instead of the recipe's 16 (an eighth of the cost: the test
    # checks what is said and that nothing is written; the minutes are a rate per image).
    monkeypatch.setitem(RECIPE, "batch_size", 2)
    assert (
        main(
            [
                "bootstrap",
                "--repository",
                str(tmp_path / "repo"),
                "--work-dir",
                str(tmp_path),
                "--estimate-only",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    arithmetic = "float32" if autocast_dtype(torch.device("cpu")) is None else "bfloat16"
    minutes = re.search(r"about (\d+) minutes for (\d+) epochs", out)
    assert f", {arithmetic}: " in out and minutes, out
    assert int(minutes.group(1)) > 0 and int(minutes.group(2)) == RECIPE["epochs"]
    assert list(tmp_path.iterdir()) == []  # no data, no run, no repository


def test_the_recipe_is_the_one_the_shipped_model_was_trained_with():
    provenance = json.loads((FILES / "model.json").read_text())["provenance"]
    trained = provenance["config"]
    for key, value in RECIPE.items():
        assert trained[key] == (list(value) if isinstance(value, tuple) else value), key
    data = provenance["data"]
    for key in ("count", "seed", "min_size", "max_size", "max_objects"):
        assert data[key] == getattr(SYNTH, key), key
    assert data["object_scale"] == list(SYNTH.object_scale)
