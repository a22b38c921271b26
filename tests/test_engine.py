"""The engine: one image or a batch through a real onnxruntime session, against an
independent reference (numpy normalisation + the session called directly)."""

import numpy as np
import onnxruntime as ort
import pytest

from segserve.contracts.repository import walk
from segserve.service.runtime.engine import Engine, ProviderUnavailable, choose_providers


@pytest.fixture(scope="module")
def model_path(tiny_repository):
    """`tiny` v1: the older kind, float NCHW in, logits out."""
    return next(walk(tiny_repository)).model_path


@pytest.fixture(scope="module")
def uint8_engine(tiny_repository):
    """`tiny` v2: uint8 NHWC pixels in, labels out."""
    return Engine.load(list(walk(tiny_repository))[1].model_path, "cpu", intra_op_threads=2)


@pytest.fixture(scope="module")
def engine(model_path):
    return Engine.load(model_path, "cpu", intra_op_threads=2)


def image(h, w, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def reference(model_path, rgb):
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    x = ((rgb / 255 - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)
    return session.run(None, {"image": x})[0][0].argmax(0)


def test_segment_gives_the_labels_of_the_graph_at_the_images_size(engine, model_path):
    rgb = image(37, 53)
    (labels,) = engine.segment([rgb])
    assert labels.dtype == np.uint8 and labels.shape == (37, 53)
    assert np.array_equal(labels, reference(model_path, rgb))


def test_a_float_models_input_is_normalised_here(engine):
    item = engine.prepare(np.full((2, 3, 3), 255, np.uint8))
    assert item.shape == (3, 2, 3) and item.dtype == np.float32
    assert item[0, 0, 0] == pytest.approx((1 - 0.485) / 0.229, rel=1e-5)


def test_mixed_sizes_are_padded_to_the_divisor_and_cropped_back(engine, model_path):
    images = [image(45, 67, 1), image(10, 20, 2), image(45, 67, 3)]
    items = [engine.prepare(im) for im in images]
    batch = engine.stack(items)
    assert batch.shape == (3, 3, 48, 80)
    assert np.all(batch[1, :, 10:, :20] == batch[1, :, 9:10, :20])  # its last row, repeated
    assert np.all(batch[0, :, 45:, :] == batch[0, :, 44:45, :])
    same = engine.stack([items[0], items[2]])
    assert same.shape == (2, 3, 45, 67)  # one size: nothing padded
    labels = engine.run(batch, [engine.item_size(it) for it in items])
    assert [lab.shape for lab in labels] == [(45, 67), (10, 20), (45, 67)]
    for im, lab in zip(images, labels, strict=True):
        assert (lab == reference(model_path, im)).mean() >= 0.99


def test_a_uint8_model_takes_the_pixels_as_they_are_and_batches_pad_by_repeating_the_edge(
    uint8_engine, engine, model_path
):
    rgb, small = image(21, 30, 5), image(5, 7, 6)
    assert uint8_engine.prepare(rgb) is rgb  # no host work at all
    batch = uint8_engine.stack([rgb, small])
    assert batch.shape == (2, 32, 32, 3) and batch.dtype == np.uint8
    assert np.array_equal(batch[1, :5, :7], small)
    assert (batch[1, 5:, :7] == small[4]).all()  # the last row, repeated downwards
    assert (batch[1, :, 7:] == batch[1, :, 6:7]).all()  # the last column, rightwards
    assert (batch[1, 31, 31] == small[4, 6]).all()  # the corner
    chw = engine.stack([engine.prepare(rgb), engine.prepare(small)])  # float NCHW the same way
    assert np.array_equal(chw[1, :, 5:, :7], np.broadcast_to(chw[1, :, 4:5, :7], (3, 27, 7)))
    labels = uint8_engine.run(batch, [(21, 30), (5, 7)])
    assert [lab.shape for lab in labels] == [(21, 30), (5, 7)]
    (alone,) = uint8_engine.segment([rgb])
    assert (alone == reference(model_path, rgb)).mean() >= 0.999


def test_the_card_must_name_the_graphs_input_and_output(model_path, engine):
    wrong = engine.card.replace(output_name="scores")
    with pytest.raises(ValueError, match="outputs \\['logits'\\]"):
        Engine.load(model_path, "cpu", card=wrong)


def test_a_provider_asked_for_by_name_must_load_and_auto_falls_back():
    with pytest.raises(ProviderUnavailable, match="cuda"):
        choose_providers("cuda", ["CPUExecutionProvider"])
    assert choose_providers("auto", ["CPUExecutionProvider"]) == (["CPUExecutionProvider"], False)
    gpu = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers("auto", gpu) == (gpu, False)
    assert choose_providers("cuda,cpu", gpu) == (gpu, True)
    with pytest.raises(ValueError, match="unknown provider"):
        choose_providers("tpu", gpu)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_the_cpu_arena_is_kept_after_small_runs_and_given_back_after_large_ones(
    tiny_repository,
):
    """The arena is on (runs reuse its memory instead of faulting pages in afresh); a run on
    `arena_shrink_pixels` or more must not leave its peak held for good."""
    model_path = list(walk(tiny_repository))[1].model_path  # uint8 in, labels out
    big = image(1500, 1500)
    keeps = Engine.load(model_path, "cpu", 2, arena_shrink_pixels=None)
    shrinks = Engine.load(model_path, "cpu", 2, arena_shrink_pixels=1_000_000)
    before = _rss_mb()
    kept_labels = keeps.segment([big])[0]
    held_by_keeping = _rss_mb() - before
    before = _rss_mb()
    shrunk_labels = shrinks.segment([big])[0]
    held_by_shrinking = _rss_mb() - before
    assert np.array_equal(kept_labels, shrunk_labels)
    assert held_by_keeping > 40, held_by_keeping
    assert held_by_shrinking < held_by_keeping / 4, (held_by_shrinking, held_by_keeping)
    assert Engine.load(model_path, "cpu", 2, cpu_arena=False).shrink_at_pixels is None


def test_a_cpu_engine_limits_batches_to_what_keeps_its_arena(tiny_repository):
    model_path = list(walk(tiny_repository))[1].model_path
    assert (
        Engine.load(model_path, "cpu", 1, arena_shrink_pixels=800_000).batch_pixel_limit == 799_999
    )
    assert Engine.load(model_path, "cpu", 1, arena_shrink_pixels=None).batch_pixel_limit is None
    assert Engine.load(model_path, "cpu", 1, cpu_arena=False).batch_pixel_limit is None
