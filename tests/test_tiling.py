"""Overlap-tile geometry on its own: where tiles lie, what each keeps, and that a network
whose receptive field the halo covers gives in tiles exactly the labels it gives whole. The
"network" is a numpy local filter that zero-pads at its input's edges as a conv does, so a
missing halo shows as a seam."""

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from segserve.contracts.card import ModelCard
from segserve.service.media.tiling import (
    ScalePlan,
    TilingError,
    axis_spans,
    effective_tile,
    keep_centre,
    plan_tiles,
    tile_pixels,
)


@given(
    length=st.integers(1, 5000),
    tile_cells=st.integers(4, 40),
    halo_cells=st.integers(0, 8),
    divisor=st.sampled_from([1, 16, 32]),
)
def test_kept_parts_cover_the_axis_once_with_a_halo_of_context_and_windows_on_the_lattice(
    length, tile_cells, halo_cells, divisor
):
    tile, halo = tile_cells * divisor, halo_cells * divisor
    fits = -(-length // divisor) * divisor <= tile
    if tile - 2 * halo < divisor and not fits:
        with pytest.raises(TilingError):
            axis_spans(length, tile, halo, divisor)
        return
    spans = axis_spans(length, tile, halo, divisor)
    assert (len(spans) == 1) == fits
    kept = np.zeros(length, int)
    for s in spans:
        assert s.start % divisor == 0 and s.stop - s.start <= max(tile, length * (len(spans) == 1))
        assert s.start <= s.keep_start < s.keep_stop <= s.stop
        kept[s.keep_start : s.keep_stop] += 1
        # real context on each side of what is kept, unless that side is the image's border
        assert s.keep_start == 0 or s.keep_start - s.start >= halo
        assert s.keep_stop == length or s.stop - s.keep_stop >= halo
    assert (kept == 1).all()
    assert spans[-1].stop == length  # the last tile ends where the image ends


def test_an_axis_that_fits_one_tile_runs_whole():
    assert [(s.start, s.stop) for s in axis_spans(500, 512, 64, 16)] == [(0, 500)]
    # 513 px round up to 528 on the 16-px lattice: two windows, the last shifted back
    spans = axis_spans(513, 512, 64, 16)
    assert [(s.start, s.stop) for s in spans] == [(0, 512), (16, 513)]


def box_network(rgb: np.ndarray, radius: int) -> np.ndarray:
    """A local 'segmenter': the mean of the red channel over a (2r+1)^2 window, zero-padded
    at the input's own edges, thresholded into two classes."""
    red = np.pad(rgb[..., 0].astype(np.float64), radius)
    sums = red.cumsum(0).cumsum(1)
    sums = np.pad(sums, ((1, 0), (1, 0)))
    k = 2 * radius + 1
    h, w = rgb.shape[:2]
    window = sums[k:, k:] - sums[:-k, k:] - sums[k:, :-k] + sums[:-k, :-k]
    return (window[:h, :w] / k**2 > 100).astype(np.uint8)


def tiled(rgb: np.ndarray, tile: int, halo: int, divisor: int, run) -> np.ndarray:
    labels = np.empty(rgb.shape[:2], np.uint8)
    grid = plan_tiles(rgb.shape[:2], tile, halo, divisor)
    assert grid.count > 1
    for t in grid.tiles:
        keep_centre(labels, run(tile_pixels(rgb, t)), t)
    return labels


def test_tiled_labels_equal_whole_image_labels_when_the_halo_covers_the_receptive_field():
    rng = np.random.default_rng(0)
    smooth = rng.integers(0, 256, (40, 55, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    rgb = smooth[:317, :431]
    whole = box_network(rgb, radius=12)
    assert np.array_equal(tiled(rgb, 96, 16, 16, lambda x: box_network(x, 12)), whole)
    # The same tiles with too little context leave seams: the check can fail.
    short = tiled(rgb, 96, 16, 16, lambda x: box_network(x, 24))
    assert not np.array_equal(short, box_network(rgb, 24))


def card(**scale) -> ModelCard:
    return ModelCard(
        name="m",
        architecture="unet",
        num_classes=2,
        class_names=["a", "b"],
        palette=[[0, 0, 0], [1, 1, 1]],
        mean=[0.5] * 3,
        std=[0.5] * 3,
        output="labels",
        size_divisor=16,
        **scale,
    )


def test_a_plan_tiles_native_images_past_one_tile_and_scales_fit_ones():
    native = ScalePlan.for_card(card(scale_policy="native"), None, 768)
    assert (native.tile, native.halo) == (768, 80)  # U-Net's measured halo from the card
    assert native.grid((768, 768)) is None and native.inference_size((3000, 4000)) == (3000, 4000)
    roomy = ScalePlan.for_card(card(scale_policy="native"), None, 512, whole_pixels=800_000)
    assert roomy.grid((768, 1024)) is None and roomy.grid((800, 1024)) is not None
    assert native.grid((3000, 4000)).count > 1
    fit = ScalePlan.for_card(card(scale_policy="native"), "fit", 768)
    assert fit.grid((3000, 4000)) is None
    assert fit.inference_size((3000, 4000)) == (866, 1154)  # the card's 1 MP
    with pytest.raises(ValueError, match="not offered"):
        ScalePlan.for_card(card(scale_policies=["fit"]), "native", 768)


def test_a_tile_stays_on_the_lattice_and_keeps_at_least_half_its_side():
    assert effective_tile(770, 64, 16) == 768
    assert effective_tile(256, 192, 32) == 768  # FCN's halo needs a 768-px tile
    assert effective_tile(100, 0, 32) == 96


@pytest.mark.slow
def test_fcn8s_tiled_labels_equal_whole_image_labels_with_its_halo():
    """FCN-8s (random weights, Kaiming-scaled so that its labels vary) on a 1.1 MP image that
    also runs whole: tiles of 768 px with FCN's halo, on its 32-px lattice, the 100-px input
    pad inside each tile. About a minute of two cores (make test-slow)."""
    from bench.tiles import fcn8s_runner
    from segserve.contracts.architectures import tile_halo
    from segserve.training.synth import DEFAULT_MODEL_SET, SynthConfig, render_mosaic

    run = fcn8s_runner()
    config = SynthConfig(count=10**6, seed=5, **DEFAULT_MODEL_SET)
    rgb, _, _ = render_mosaic(config, (1024, 1088))
    whole = run(rgb)
    assert len(np.unique(whole)) >= 3  # labels that vary: the comparison means something
    halo = tile_halo("fcn8s")
    labels = tiled(rgb, effective_tile(768, halo, 32), halo, 32, run)
    assert (labels == whole).mean() >= 0.999


@pytest.mark.slow
def test_a_40_megapixel_image_is_answered_by_a_default_server_in_bounded_memory(tmp_path):
    """`segserve serve` with its default settings and the shipped model: a 40 MP JPEG is
    answered at its own size in tiles, and the server's peak resident memory (VmHWM, start-up
    included) stays under 1.25 GiB: 631 MiB when ready (the runtime, and the arena holding a
    full CPU batch's activations since the load timed one), about 480 MiB more for the image
    (its RGB, labels and decode: 40 MP of the pixel budget's 6 bytes a pixel), measured 1,109
    MiB on EPYC-AVX2. About a minute and a half on two cores (make test-slow)."""
    import io

    from PIL import Image

    from helpers import run_server
    from segserve.default_model import install
    from segserve.training.synth import DEFAULT_MODEL_SET, JPEG_QUALITY, SynthConfig, render_mosaic

    rgb, _, _ = render_mosaic(SynthConfig(count=10**6, seed=99, **DEFAULT_MODEL_SET), (5472, 7296))
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=JPEG_QUALITY)
    del rgb
    install(tmp_path / "repo")
    defaults = {
        "warmup_shapes": "512x512,375x500",
        "intra_op_threads": os.cpu_count(),
        "tile_size": None,
    }
    with run_server(tmp_path / "repo", tmp_path, **defaults) as server, server.client() as c:
        # The client waits as long as the server gives the request: 30 s and 2 s a megapixel.
        r = c.post(
            "/segment",
            content=buffer.getvalue(),
            headers={"Content-Type": "image/jpeg"},
            timeout=30 + 2 * 45,
        )
        assert r.status_code == 200, r.text
        assert Image.open(io.BytesIO(r.content)).size == (7296, 5472)
        assert r.headers["x-scale"] == "native" and int(r.headers["x-tiles"]) > 50
        status = Path(f"/proc/{server.proc.pid}/status").read_text()
        peak_kb = next(
            int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")
        )
    assert peak_kb <= 1.25 * 1024 * 1024, f"peak RSS {peak_kb / 1024:.0f} MiB"
