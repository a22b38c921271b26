"""The gate a new version passes before it takes its model's traffic: scores on the model's
labelled check set, compared with the serving version's.

    REPO/NAME/checkset/            a VOC-layout folder beside the versions:
        JPEGImages/ID.jpg          the images
        SegmentationClass/ID.png   their labels (class ids, 255 ignored)
        ImageSets/Segmentation/val.txt   the ids to score
    REPO/NAME/pin                  a version number: that version serves, whatever is newer

Triton, TorchServe and KServe check that a version loads and runs; a version that loads and
runs but can no longer say one class (a bias gone wrong) would take all the traffic there.
Here it must score within `gate_tolerance` of the serving version's mean IU on the check set,
and no class may fall below the floor (the card's `class_floor`, else the setting). Pure
functions but `load_check_set`, `read_pin` (the repository) and `score` (runs the network).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from segserve.contracts.palette import IGNORE_LABEL
from segserve.service.telemetry.drift import class_mix
from segserve.training.metrics import ConfusionMatrix, segmentation_scores

CHECKSET_DIR = "checkset"
PIN_FILE = "pin"
CHECK_SPLIT = "val"


class CheckSetError(ValueError):
    """A check set that does not fit the model (class ids it lacks): the set is at fault,
    not the version, so the version goes ungated and the operator is told."""


@dataclass(frozen=True)
class CheckSet:
    root: Path
    images: list[np.ndarray] = field(repr=False)
    labels: list[np.ndarray] = field(repr=False)
    signature: tuple = field(repr=False)  # its files and their mtimes: a changed set is read again


def check_set_signature(model_dir: Path) -> tuple | None:
    split = Path(model_dir) / CHECKSET_DIR / "ImageSets" / "Segmentation" / f"{CHECK_SPLIT}.txt"
    if not split.is_file():
        return None
    root = split.parents[2]
    files = sorted(p for sub in ("JPEGImages", "SegmentationClass") for p in (root / sub).glob("*"))
    return (split.stat().st_mtime, *((p.name, p.stat().st_mtime) for p in files))


def load_check_set(model_dir: Path) -> CheckSet | None:
    """A model's check set, or None where it has none. ValueError for one that is broken
    (an id without its image or label, sizes that differ)."""
    signature = check_set_signature(model_dir)
    if signature is None:
        return None
    root = Path(model_dir) / CHECKSET_DIR
    ids = (root / "ImageSets" / "Segmentation" / f"{CHECK_SPLIT}.txt").read_text().split()
    if not ids:
        raise ValueError(f"{root} lists no images")
    images, labels = [], []
    for image_id in ids:
        try:
            with Image.open(root / "JPEGImages" / f"{image_id}.jpg") as im:
                rgb = np.asarray(im.convert("RGB"))
            with Image.open(root / "SegmentationClass" / f"{image_id}.png") as lab:
                target = np.asarray(lab)
        except OSError as exc:
            raise ValueError(f"check set {root}: {image_id}: {exc}") from exc
        if target.shape != rgb.shape[:2]:
            raise ValueError(f"check set {root}: {image_id}'s label is not its image's size")
        images.append(rgb)
        labels.append(target)
    return CheckSet(root, images, labels, signature)


@dataclass(frozen=True)
class Scores:
    """A version's figures on the check set: mean IU, per-class IU (None: class absent from
    both truth and prediction), and the class mix of its predictions (drift's reference)."""

    images: int
    mean_iu: float
    per_class_iu: list[float | None]
    predicted_mix: list[float]

    def as_dict(self) -> dict:
        return {
            "images": self.images,
            "mean_iu": self.mean_iu,
            "per_class_iu": self.per_class_iu,
        }


def score(segment: Callable[[np.ndarray], np.ndarray], check: CheckSet, num_classes: int) -> Scores:
    """Run every check-set image through `segment` (one image -> its labels) and score it
    as `segserve eval` does (training/metrics.py)."""
    fits(check, num_classes)
    return scores_of([segment(rgb) for rgb in check.images], check, num_classes)


def fits(check: CheckSet, num_classes: int) -> None:
    """CheckSetError where the set's labels name classes the model lacks (the set's fault,
    not the model's)."""
    for truth in check.labels:
        known = truth[truth != IGNORE_LABEL]
        if known.size and known.max() >= num_classes:
            raise CheckSetError(
                f"check set labels hold class {int(known.max())}; the model has {num_classes}"
            )


def scores_of(predictions: list[np.ndarray], check: CheckSet, num_classes: int) -> Scores:
    """The scores of a network's labels of every check-set image (in the set's order)."""
    matrix = ConfusionMatrix(num_classes)
    predicted = []
    for labels, truth in zip(predictions, check.labels, strict=True):
        matrix.update(labels, truth)
        predicted.append(np.bincount(labels.ravel(), minlength=num_classes))
    scores = segmentation_scores(matrix.matrix)
    iu = scores["per_class_iu"]
    return Scores(
        len(check.images),
        0.0 if np.isnan(scores["mean_iu"]) else scores["mean_iu"],
        [None if np.isnan(v) else v for v in iu],
        [float(v) for v in class_mix(predicted)],
    )


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: str


def judge(
    candidate: Scores,
    serving: Scores | None,
    tolerance: float,
    class_floor: float | None,
    class_names: list[str],
) -> Verdict:
    """Whether a version may take traffic: mean IU no more than `tolerance` under the serving
    version's (when one serves), every class present at or above `class_floor`."""
    if class_floor is not None:
        low = [
            f"{name} {iu:.3f}"
            for name, iu in zip(class_names, candidate.per_class_iu, strict=True)
            if iu is not None and iu < class_floor
        ]
        if low:
            return Verdict(False, f"classes under the floor of {class_floor}: {', '.join(low)}")
    if serving is not None and candidate.mean_iu < serving.mean_iu - tolerance:
        return Verdict(
            False,
            f"mean IU {candidate.mean_iu:.4f} on the check set, more than {tolerance} under "
            f"the serving version's {serving.mean_iu:.4f}",
        )
    if serving is None:
        return Verdict(True, f"mean IU {candidate.mean_iu:.4f} on the check set (first version)")
    return Verdict(
        True,
        f"mean IU {candidate.mean_iu:.4f} on the check set (serving version: {serving.mean_iu:.4f})",
    )


def read_pin(model_dir: Path) -> int | None:
    """The version REPO/NAME/pin names, or None (no pin, or not a version number)."""
    path = Path(model_dir) / PIN_FILE
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


@dataclass(frozen=True)
class Refusal:
    version: int
    reason: str
    scores: Scores | None
    files: tuple  # the version's files when refused: reviewed again once they change


class VersionGate:
    """The gate's memory: each model's check set (read again when its files change), each
    version's scores (a version is scored once per check set and set of files), the versions
    refused and why, and the pins. The registry asks it whether a loaded version may serve
    and which version serves requests that name none."""

    def __init__(self, tolerance: float, class_floor: float | None) -> None:
        self.tolerance, self.class_floor = tolerance, class_floor
        self._checks: dict[str, CheckSet | None] = {}
        self._scores: dict[tuple, Scores] = {}
        self.refused: dict[tuple[str, int], Refusal] = {}
        self.pins: dict[str, int] = {}
        self.reviewing: set[tuple[str, int]] = set()
        # Passed the check set, loaded, waiting on shadow traffic before it serves.
        self.candidates: set[tuple[str, int]] = set()

    def check_set(self, name: str) -> CheckSet | None:
        return self._checks.get(name)

    def refresh(self, model_dir: Path) -> None:
        """Read a model's pin and (when its files changed) its check set. Blocking: call in
        a worker thread. A broken check set gates nothing and is logged by the caller."""
        name = model_dir.name
        pin = read_pin(model_dir)
        if pin is None:
            self.pins.pop(name, None)
        else:
            self.pins[name] = pin
        current = self._checks.get(name)
        signature = check_set_signature(model_dir)
        if signature is None:
            self._checks[name] = None
        elif current is None or current.signature != signature:
            self._checks[name] = load_check_set(model_dir)

    def scores(
        self,
        name: str,
        version: int,
        files: tuple,
        run: Callable[[np.ndarray], np.ndarray],
        num_classes: int,
    ) -> Scores | None:
        """A version's scores on its model's check set (None: no check set), computed once.
        Blocking (it runs the network): call in a worker thread."""
        check = self._checks.get(name)
        if check is None:
            return None
        key = (name, version, files, check.signature)
        if key not in self._scores:
            self._scores[key] = score(run, check, num_classes)
        return self._scores[key]

    def remember(
        self, name: str, version: int, files: tuple, check: CheckSet, scores: Scores
    ) -> None:
        """Scores computed elsewhere on `check` (the variant check scores what will serve):
        not computed again while the model's check set is that one."""
        self._scores[(name, version, files, check.signature)] = scores

    def cached(self, name: str, version: int, files: tuple) -> Scores | None:
        check = self._checks.get(name)
        if check is None:
            return None
        return self._scores.get((name, version, files, check.signature))

    def judge(
        self,
        name: str,
        candidate: Scores | None,
        serving: Scores | None,
        card_floor: float | None,
        class_names: list[str],
    ) -> Verdict:
        if candidate is None:
            return Verdict(True, "ungated: the model has no check set")
        floor = card_floor if card_floor is not None else self.class_floor
        return judge(candidate, serving, self.tolerance, floor, class_names)

    def refuse(
        self, name: str, version: int, reason: str, scores: Scores | None, files: tuple
    ) -> None:
        self.refused[(name, version)] = Refusal(version, reason, scores, files)

    def still_refused(self, name: str, version: int, files: tuple) -> bool:
        refusal = self.refused.get((name, version))
        return refusal is not None and refusal.files == files

    def forget(self, keys: set[tuple[str, int]]) -> None:
        """Versions gone from the repository."""
        for key in [k for k in self.refused if k not in keys]:
            del self.refused[key]

    def default_version(self, name: str, loaded: list[int]) -> int:
        """The version requests that name none get: the pinned one where it is loaded, else
        the newest loaded that is not a candidate still on shadow trial (every loaded
        version passed the check-set gate, or there is none)."""
        pin = self.pins.get(name)
        if pin in loaded:
            return pin
        settled = [v for v in loaded if (name, v) not in self.candidates]
        return max(settled or loaded)
