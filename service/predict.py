"""`segserve predict`: a model file on image files, no server, through the service's own
steps (decode under the same limits, the same scale plan and tiles, the engine, labels back
at the image's size, render), so its files are byte for byte what POST /segment answers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segserve.service.media.imaging import decode_opened, open_image, resize_rgb
from segserve.service.media.render import RenderSpec, class_summary, render, resize_labels
from segserve.service.media.tiling import ScalePlan, keep_centre, tile_pixels
from segserve.service.runtime.engine import Engine
from segserve.service.runtime.selection import select_for_file
from segserve.service.settings import Settings
from segserve.service.telemetry.clock import Timings


@dataclass(frozen=True)
class Prediction:
    body: bytes  # the answer, as POST /segment gives it in `fmt`
    labels: np.ndarray  # at the image's own size
    size: tuple[int, int]  # (H, W) of the image


class Predictor:
    """A model file run as the server runs it, one encoded image at a time: the variant
    chosen here (service/runtime/selection.py), the decode limits, the scale plan and its
    tiles, the labels back at the image's size, the answer rendered in `fmt` (png, overlay
    or json, as /segment's `format`). `segserve predict` and `segserve batch` both use it."""

    def __init__(
        self, model: Path, settings: Settings, fmt: str = "png", scale: str | None = None
    ) -> None:
        s = self.settings = settings
        self.selection = select_for_file(model, s)
        engine = self.engine = self.selection.engine
        self.card, self.fmt = engine.card, fmt
        whole = engine.batch_pixel_limit or 0  # as the server's engine decides it
        self.plan = ScalePlan.for_card(
            self.card, scale, s.tile_size_for(engine.provider), s.fit_pixels, whole
        )
        self.spec = RenderSpec(fmt)  # masks: none, as /segment answers by default

    def __call__(self, data: bytes) -> Prediction:
        s, plan = self.settings, self.plan
        image, probe = open_image(data, s.max_image_pixels, s.formats)
        fit = plan.fit_pixels if plan.policy == "fit" else None
        rgb = decode_opened(image, probe, fit, s.formats)
        labels = segment(self.engine, rgb, plan)
        h, w = probe.height, probe.width
        labels = resize_labels(labels, h, w)
        rgb = resize_rgb(rgb, h, w) if self.fmt == "overlay" else rgb
        header = {"model": self.card.name, "version": self.card.version, "width": w, "height": h}
        body, _ = render(rgb, labels, self.card, self.spec, header, Timings())
        return Prediction(body, labels, (h, w))


def predict_files(
    images: list[Path],
    model: Path,
    out: Path,
    fmt: str = "png",
    settings: Settings | None = None,
    scale: str | None = None,
) -> list[Path]:
    """Write the label PNG (or overlay) of each image into `out`; returns the files.
    `settings` (default: from SEGSERVE_* variables) bound the pixels and size the tiles as
    the server's do; `scale` is the policy (default: the model's)."""
    predictor = Predictor(model, settings or Settings(), fmt, scale)
    engine = predictor.engine
    print(f"{model}: {engine.variant} on {engine.provider} ({predictor.selection.choice.reason})")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in images:
        answer = predictor(Path(path).read_bytes())
        target = out / f"{Path(path).stem}{'_overlay' if fmt == 'overlay' else ''}.png"
        target.write_bytes(answer.body)
        written.append(target)
        names = ", ".join(c["name"] for c in class_summary(answer.labels, predictor.card))
        h, w = answer.size
        print(f"{path} -> {target}  ({w}x{h}; classes: {names})")
    return written


def segment(engine: Engine, rgb: np.ndarray, plan: ScalePlan) -> np.ndarray:
    """One image's labels at inference size: whole, or tile by tile as the service runs them."""
    grid = plan.grid(rgb.shape[:2])
    if grid is None:
        return engine.segment([rgb])[0]
    labels = np.empty(rgb.shape[:2], np.uint8)
    for tile in grid.tiles:
        keep_centre(labels, engine.segment([tile_pixels(rgb, tile)])[0], tile)
    return labels
