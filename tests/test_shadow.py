"""Shadow traffic (service/shadow.py): a version that passes the check set while another
serves answers live requests in the shadow first; its answers never reach a client, and it
serves only once enough of them agree with the served ones. On the tiny model with a check
set of its own answers: a version that cannot say the model's commonest class, let through
by a check-set tolerance opened wide, is refused on live traffic; an unchanged copy is
promoted."""

import shutil

import numpy as np

from helpers import (
    image_bytes,
    in_process,
    metric_samples,
    wait_for,
    without_its_commonest_class,
    write_check_set,
)
from segserve.service.shadow import label_agreement


def test_agreement_is_the_mean_iu_of_one_label_map_against_the_other():
    a = np.array([[0, 0, 1, 1]], np.uint8)
    assert label_agreement(a, a, 3) == 1.0
    assert label_agreement(a, np.array([[0, 0, 0, 1]], np.uint8), 3) == (2 / 3 + 1 / 2) / 2
    assert label_agreement(a, np.full_like(a, 2), 3) == 0.0


def test_a_candidate_is_tried_in_the_shadow_then_refused_or_promoted(tiny_repository, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repository / "tiny" / "2", repo / "tiny" / "1")  # uint8 in, labels out
    write_check_set(repo / "tiny")
    images = [image_bytes(64, 96, "PNG", seed=100 + i) for i in range(6)]
    settings = {
        "repository_poll_s": 0,
        "shadow_fraction": 1.0,
        "shadow_min_requests": 4,
        "gate_tolerance": 1.0,  # the check set lets anything through: the shadow must not
    }
    png = {"Content-Type": "image/png"}
    with in_process(repo, **settings) as app:
        registry = app.service.registry

        def serve_all() -> set[str]:
            answers = [app.post("/segment", content=b, headers=png) for b in images]
            assert all(r.status_code == 200 for r in answers)
            return {r.headers["x-model-version"] for r in answers}

        (repo / "tiny" / "2").mkdir()
        without_its_commonest_class(repo / "tiny", repo / "tiny" / "2")
        app.run(registry.sync())
        states = {s["version"]: s["state"] for s in registry.states("tiny")}
        assert states == {1: "serving", 2: "candidate"}
        assert serve_all() == {"1"}  # the candidate's answers never reach a client
        wait_for(lambda: ("tiny", 2) in registry.gate.refused, what="v2 refused")
        assert "shadowed requests" in registry.gate.refused[("tiny", 2)].reason
        trial = app.service.shadow.trials[("tiny", 2)]
        assert trial.requests >= 4 and trial.agreement < 0.95

        shutil.copytree(repo / "tiny" / "1", repo / "tiny" / "3")
        app.run(registry.sync())
        assert registry.get("tiny").version == 1 and registry.candidate("tiny").version == 3
        serve_all()
        wait_for(lambda: registry.get("tiny").version == 3, what="v3 promoted")
        assert app.service.shadow.trials[("tiny", 3)].agreement == 1.0
        assert serve_all() == {"3"}
        samples = metric_samples(app.get("/metrics").text)
    shadowed = {
        (s.labels["version"], s.labels["outcome"]): s.value
        for s in samples["segserve_shadow_requests_total"]
    }
    assert shadowed[("2", "ok")] >= 4 and shadowed[("3", "ok")] >= 4
    decisions = {s.labels["outcome"]: s.value for s in samples["segserve_gate_decisions_total"]}
    assert decisions == {"promoted": 2, "refused": 1}  # v1 at start, v3; v2
