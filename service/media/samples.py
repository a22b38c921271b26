"""Sample images for the web page: a few pictures of the synthetic shapes data set (what
the default model is trained on), drawn from a seed the training set never uses, so a person
can try the service without an image of their own. Rendered once, on first request."""

from __future__ import annotations

import io
from functools import cache

from segserve.training.synth import DEFAULT_MODEL_SET, JPEG_QUALITY, SynthConfig, render_sample

SEED = 20150607  # not a training seed (bootstrap trains on seed 0)
COUNT = 4


@cache
def samples() -> dict[str, bytes]:
    """name -> JPEG bytes."""
    config = SynthConfig(count=COUNT, seed=SEED, **{**DEFAULT_MODEL_SET, "min_size": 176})
    out = {}
    for i in range(COUNT):
        image, _ = render_sample(config, i)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=JPEG_QUALITY)
        out[f"shapes-{i + 1}.jpg"] = buffer.getvalue()
    return out
