"""Mask-aware augmentation with torchvision.transforms.v2: the label map moves with the image.

v2 resizes a tv_tensors.Mask with nearest neighbour and leaves it out of colour jitter.
Padding happens after normalisation and fills the image with 0 (the data set's mean colour:
what the network's own padding to its size divisor, the convolutions' zero padding and the
server's batch padding all put beyond an image's border) and the mask with 255 (ignored).
"""

from __future__ import annotations

import random

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from segserve.contracts.palette import IGNORE_LABEL


class RandomScale:
    """Resize by a factor drawn from [low, high] (image bilinear, mask nearest)."""

    def __init__(self, low: float, high: float) -> None:
        self.low, self.high = low, high

    def __call__(self, image, target):
        h, w = TF.get_size(image)
        s = random.uniform(self.low, self.high)
        size = [max(1, round(h * s)), max(1, round(w * s))]
        return TF.resize(image, size, antialias=True), TF.resize(target, size)


def _to_tv(image, target):
    return TF.to_image(image), tv_tensors.Mask(
        torch.as_tensor(TF.pil_to_tensor(target)[0], dtype=torch.int64)
    )


class TrainTransform:
    """Random scale, flip and colour jitter, then a random crop of `crop_size`.

    `margin` pads every side by that many pixels before the crop, so crops hold an image
    border as often as a served image does (it always has four). Crops from inside larger
    images seldom did, and the network learned nothing of borders: a model trained so called
    27 % of the background pixels next to the border some object (docs/benchmarks.md).
    """

    def __init__(
        self,
        crop_size: int,
        mean,
        std,
        scale=(0.5, 2.0),
        hflip: float = 0.5,
        jitter: float = 0.2,
        margin: int = 0,
    ) -> None:
        self.scale = RandomScale(*scale)
        self.augment = v2.Compose(
            [
                v2.RandomHorizontalFlip(hflip),
                v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean, std),
                v2.RandomCrop(
                    crop_size,
                    padding=margin or None,
                    pad_if_needed=True,
                    fill={tv_tensors.Image: 0.0, tv_tensors.Mask: IGNORE_LABEL},
                ),
            ]
        )

    def __call__(self, image, target):
        image, target = self.augment(*self.scale(*_to_tv(image, target)))
        return image.as_subclass(torch.Tensor), target.as_subclass(torch.Tensor)


class EvalTransform:
    """No augmentation: the image at its own size, normalised."""

    def __init__(self, mean, std) -> None:
        self.finish = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])

    def __call__(self, image, target):
        image, target = _to_tv(image, target)
        return self.finish(image), target.as_subclass(torch.Tensor)
