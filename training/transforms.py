"""Mask-aware augmentation with torchvision.transforms.v2: the label map moves with the image.

v2 resizes a tv_tensors.Mask with nearest neighbour and leaves it out of colour jitter;
padding fills the mask with 255 so padded pixels are ignored by the loss.
"""

from __future__ import annotations

import random

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

IGNORE = 255


class RandomScale:
    """Resize by a factor drawn from [low, high] (image bilinear, mask nearest)."""

    def __init__(self, low: float, high: float) -> None:
        self.low, self.high = low, high

    def __call__(self, image, target):
        h, w = TF.get_size(image)
        s = random.uniform(self.low, self.high)
        size = [max(1, round(h * s)), max(1, round(w * s))]
        return TF.resize(image, size, antialias=True), TF.resize(target, size)


class PadToAtLeast:
    """Pad bottom/right so a crop of `size` fits; the mask gets the ignore label."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image, target):
        h, w = TF.get_size(image)
        pad = [0, 0, max(0, self.size - w), max(0, self.size - h)]
        if pad[2] or pad[3]:
            image, target = TF.pad(image, pad, fill=0), TF.pad(target, pad, fill=IGNORE)
        return image, target


def _to_tv(image, target):
    return TF.to_image(image), tv_tensors.Mask(
        torch.as_tensor(TF.pil_to_tensor(target)[0], dtype=torch.int64)
    )


class TrainTransform:
    def __init__(
        self, crop_size: int, mean, std, scale=(0.5, 2.0), hflip: float = 0.5, jitter: float = 0.2
    ) -> None:
        self.scale = RandomScale(*scale)
        self.pad = PadToAtLeast(crop_size)
        self.joint = v2.Compose([
            v2.RandomCrop(crop_size),
            v2.RandomHorizontalFlip(hflip),
            v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter),
        ])  # fmt: skip
        self.finish = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])

    def __call__(self, image, target):
        image, target = _to_tv(image, target)
        image, target = self.pad(*self.scale(image, target))
        image, target = self.joint(image, target)
        return self.finish(image), target.as_subclass(torch.Tensor)


class EvalTransform:
    """No augmentation: the image at its own size, normalised."""

    def __init__(self, mean, std) -> None:
        self.finish = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])

    def __call__(self, image, target):
        image, target = _to_tv(image, target)
        return self.finish(image), target.as_subclass(torch.Tensor)
