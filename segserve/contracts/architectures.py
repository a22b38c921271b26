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


def size_divisor(architecture: str) -> int:
    """The stride of `architecture`; 1 (no constraint) for one segserve did not build."""
    return SIZE_DIVISORS.get(architecture, 1)


def padded_size(size: tuple[int, int], divisor: int) -> tuple[int, int]:
    """(H, W) rounded up to multiples of `divisor`: what a batch pads an image to."""
    return -(-size[0] // divisor) * divisor, -(-size[1] // divisor) * divisor
