"""The networks: FCN-32s/16s/8s on VGG16 and U-Net, built by name."""

from __future__ import annotations

from torch import nn

from segserve.contracts.architectures import FCN_STRIDES, MODEL_NAMES
from segserve.models.fcn import FCN, fcn_from_coarser
from segserve.models.unet import UNet
from segserve.models.vgg import (
    PretrainedWeightsUnavailable,
    convolutionalize_vgg16,
    load_vgg16_state_dict,
)


def build_model(name: str, num_classes: int, **opts) -> nn.Module:
    """Build a network by name.

    FCN options: `backbone_weights` = None | "imagenet" | path of a VGG16 state dict;
    `at_once` (FCN-16s/8s trained in one go: the authors' fixed skip scaling).
    U-Net options: `width` (64 = the paper), `batch_norm`.
    """
    if name in FCN_STRIDES:
        unknown = set(opts) - {"backbone_weights", "at_once"}
        if unknown:
            raise TypeError(f"{name} takes no options {sorted(unknown)}")
        model = FCN(num_classes, FCN_STRIDES[name], at_once=opts.get("at_once", False))
        if opts.get("backbone_weights") not in (None, "none"):
            convolutionalize_vgg16(model, load_vgg16_state_dict(opts["backbone_weights"]))
        return model
    if name == "unet":
        return UNet(
            num_classes, width=opts.get("width", 64), batch_norm=opts.get("batch_norm", False)
        )
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}")


__all__ = [
    "FCN",
    "FCN_STRIDES",
    "MODEL_NAMES",
    "PretrainedWeightsUnavailable",
    "UNet",
    "build_model",
    "convolutionalize_vgg16",
    "fcn_from_coarser",
]
