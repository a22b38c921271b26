"""`segserve predict`: a model file on image files, no server, through the service's own
steps (decode under the same limits, the same scale plan and tiles, the engine, labels back
at the image's size, render), so its files are byte for byte what POST /segment answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segserve.service.media.imaging import decode_opened, open_image, resize_rgb
from segserve.service.media.render import RenderSpec, class_summary, render, resize_labels
from segserve.service.media.tiling import ScalePlan, keep_centre, tile_pixels
from segserve.service.runtime.engine import Engine
from segserve.service.runtime.selection import select_for_file
from segserve.service.settings import Settings
from segserve.service.telemetry.clock import Timings


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
    s = settings or Settings()
    selection = select_for_file(model, s)  # the variant the server would serve here
    engine = selection.engine
    print(f"{model}: {engine.variant} on {engine.provider} ({selection.choice.reason})")
    card = engine.card
    whole = engine.batch_pixel_limit or 0  # as the server's engine decides it
    plan = ScalePlan.for_card(card, scale, s.tile_size_for(engine.provider), s.fit_pixels, whole)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in images:
        image, probe = open_image(Path(path).read_bytes(), s.max_image_pixels, s.formats)
        fit = plan.fit_pixels if plan.policy == "fit" else None
        rgb = decode_opened(image, probe, fit, s.formats)
        labels = segment(engine, rgb, plan)
        h, w = probe.height, probe.width
        labels = resize_labels(labels, h, w)
        rgb = resize_rgb(rgb, h, w) if fmt == "overlay" else rgb
        body, _ = render(rgb, labels, card, RenderSpec(fmt), {}, Timings())
        target = out / f"{Path(path).stem}{'_overlay' if fmt == 'overlay' else ''}.png"
        target.write_bytes(body)
        written.append(target)
        names = ", ".join(c["name"] for c in class_summary(labels, card))
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
