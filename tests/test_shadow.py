"""Shadow traffic (service/shadow.py): a version that passes the check set while another
serves answers live requests in the shadow first; its answers never reach a client, and it
serves only once enough of them agree with the served ones. A version the check set lets
through (the tolerance opened wide here) but that cannot say "ring" is refused on live
traffic; an unchanged copy is promoted."""

import numpy as np
from PIL import Image
from test_gate import broken_copy

from helpers import in_process, metric_samples, wait_for
from segserve.contracts.repository import variant_paths
from segserve.default_model import NAME, install
from segserve.service.shadow import label_agreement


def test_agreement_is_the_mean_iu_of_one_label_map_against_the_other():
    a = np.array([[0, 0, 1, 1]], np.uint8)
    assert label_agreement(a, a, 3) == 1.0
    assert label_agreement(a, np.array([[0, 0, 0, 1]], np.uint8), 3) == (2 / 3 + 1 / 2) / 2
    assert label_agreement(a, np.full_like(a, 2), 3) == 0.0


def ring_images(repo) -> list[bytes]:
    """Check-set images with a ring in them (class 2): where a version without rings differs."""
    check = repo / NAME / "checkset"
    out = []
    for label in sorted((check / "SegmentationClass").glob("*.png")):
        if 2 in np.asarray(Image.open(label)):
            out.append((check / "JPEGImages" / f"{label.stem}.jpg").read_bytes())
    return out


def test_a_candidate_is_tried_in_the_shadow_then_refused_or_promoted(tmp_path):
    repo = tmp_path / "repo"
    for path in variant_paths(install(repo)).values():
        path.unlink()
    images = ring_images(repo)[:6]
    assert len(images) == 6
    settings = {
        "variant": "float32",
        "repository_poll_s": 0,
        "shadow_fraction": 1.0,
        "shadow_min_requests": 4,
        "gate_tolerance": 1.0,  # the check set lets anything through: the shadow must not
    }
    jpeg = {"Content-Type": "image/jpeg"}
    with in_process(repo, **settings) as app:
        registry = app.service.registry

        def serve_all() -> set[str]:
            answers = [app.post("/segment", content=b, headers=jpeg) for b in images]
            assert all(r.status_code == 200 for r in answers)
            return {r.headers["x-model-version"] for r in answers}

        broken_copy(repo / NAME / "1", repo / NAME / "2")
        app.run(registry.sync())
        states = {s["version"]: s["state"] for s in registry.states(NAME)}
        assert states == {1: "serving", 2: "candidate"}
        assert serve_all() == {"1"}  # the candidate's answers never reach a client
        wait_for(lambda: (NAME, 2) in registry.gate.refused, what="v2 refused")
        refusal = registry.gate.refused[(NAME, 2)]
        assert "shadowed requests" in refusal.reason
        trial = app.service.shadow.trials[(NAME, 2)]
        assert trial.requests >= 4 and trial.agreement < 0.95

        (repo / NAME / "3").mkdir()
        for f in (repo / NAME / "1").iterdir():
            (repo / NAME / "3" / f.name).write_bytes(f.read_bytes())
        app.run(registry.sync())
        assert registry.get(NAME).version == 1 and registry.candidate(NAME).version == 3
        serve_all()
        wait_for(lambda: registry.get(NAME).version == 3, what="v3 promoted")
        assert app.service.shadow.trials[(NAME, 3)].agreement == 1.0
        assert serve_all() == {"3"}
        samples = metric_samples(app.get("/metrics").text)
    shadowed = {
        (s.labels["version"], s.labels["outcome"]): s.value
        for s in samples["segserve_shadow_requests_total"]
    }
    assert shadowed[("2", "ok")] >= 4 and shadowed[("3", "ok")] >= 4
    decisions = {s.labels["outcome"]: s.value for s in samples["segserve_gate_decisions_total"]}
    assert decisions == {"promoted": 2, "refused": 1}  # v1 at start, v3; v2
