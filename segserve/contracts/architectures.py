"""The architectures by name, and the stride each needs its input padded to.

Torch-free so that the CLI, the exporter and the service can name and check architectures
without building one; `segserve.models` builds them from these names.
"""

from __future__ import annotations

FCN_STRIDES = {"fcn32s": 32, "fcn16s": 16, "fcn8s": 8}
# Padding an input to a multiple of this changes nothing the network sees: FCN's five 2x2
# pools (ceil mode) make 32 for every FCN variant; U-Net's four pools make 16.
SIZE_DIVISORS = {"fcn32s": 32, "fcn16s": 32, "fcn8s": 32, "unet": 16}
MODEL_NAMES = tuple(SIZE_DIVISORS)

# Context (px) a tile brings around the part of it that is kept, so that tiled labels equal
# the whole image's on >= 99.9 % of pixels (docs/benchmarks.md, "Overlap-tile inference";
# `python -m bench.tiles halo`). U-Net, the shipped model, 640-px tiles on 1.4 MP images of
# fresh samples: 99.90-99.95 % at 64 px, 99.99 % at 80, 100 % at 96 (at 512-px tiles 64 px
# gave 99.85 %). FCN-8s (random weights, Kaiming-scaled so that the labels vary), 768-px
# tiles on a 1.3 MP image: 99.98 % at 128, 99.998 % at 192, 100 % at 256; FCN-32s/16s share
# its backbone's 404-px receptive field.
TILE_HALOS = {"unet": 80, "fcn32s": 192, "fcn16s": 192, "fcn8s": 192}
# For a network segserve did not build (segserve import), unmeasured: a generous guess that
# the card's tile_halo (segserve import --tile-halo) should replace.
DEFAULT_TILE_HALO = 128


def size_divisor(architecture: str) -> int:
    """The stride of `architecture`; 1 (no constraint) for one segserve did not build."""
    return SIZE_DIVISORS.get(architecture, 1)


def tile_halo(architecture: str) -> int:
    """The measured halo of `architecture` (DEFAULT_TILE_HALO for one segserve did not build)."""
    return TILE_HALOS.get(architecture, DEFAULT_TILE_HALO)


def padded_size(size: tuple[int, int], divisor: int) -> tuple[int, int]:
    """(H, W) rounded up to multiples of `divisor`: what a batch pads an image to."""
    return -(-size[0] // divisor) * divisor, -(-size[1] // divisor) * divisor
