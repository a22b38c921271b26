"""Convolutionalising an ImageNet VGG16 into the FCN backbone (paper, section 3.1)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from segserve.models.fcn import FCN

# torchvision's vgg16 numbers its features exactly as VGG16Features.layers does.
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


class PretrainedWeightsUnavailable(RuntimeError):
    pass


def torchvision_vgg16_state_dict() -> dict[str, torch.Tensor]:
    """ImageNet VGG16 weights through torchvision (its cache first, then a download)."""
    from torchvision.models import VGG16_Weights

    try:
        return VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError
        raise PretrainedWeightsUnavailable(
            "could not fetch torchvision's VGG16_Weights.IMAGENET1K_V1 "
            f"({exc.__class__.__name__}: {exc}). Offline, download vgg16-397923af.pth elsewhere "
            "and pass it as a local file: --backbone-weights /path/to/vgg16.pth"
        ) from exc


def load_vgg16_state_dict(source: str) -> dict[str, torch.Tensor]:
    """`imagenet` for torchvision's weights, or the path of a saved VGG16 state dict."""
    if source == "imagenet":
        return torchvision_vgg16_state_dict()
    path = Path(source)
    if not path.is_file():
        raise PretrainedWeightsUnavailable(f"VGG16 weights file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" in state:
        state = state["state_dict"]
    if looks_like_caffe_vgg16(state, path.name):
        warnings.warn(CAFFE_WARNING.format(path=path), stacklevel=2)
    return state


CAFFE_WARNING = (
    "{path} looks like a Caffe-converted VGG16 (e.g. pytorch-fcn's vgg16_from_caffe.pth): "
    "those expect BGR pixels on a 0..255 scale minus the mean, while segserve feeds RGB "
    "normalised by ImageNet's mean and std, as torchvision's weights expect. Training will "
    "start from a mis-fed backbone; use torchvision's vgg16-397923af.pth (--backbone-weights "
    "imagenet) instead."
)
# Caffe's VGG16 sees inputs ~58x larger (0..255 minus the mean, no division by the std), so
# its first filters are ~58x smaller than torchvision's; a heuristic, said as one.
CAFFE_CONV1_STD = 0.02


def looks_like_caffe_vgg16(state: dict[str, torch.Tensor], name: str = "") -> bool:
    """True when the first conv's weights are on Caffe's scale, or the file says 'caffe'."""
    conv1 = state.get("features.0.weight")
    small = conv1 is not None and float(conv1.float().std()) < CAFFE_CONV1_STD
    return small or "caffe" in name.lower()


def convolutionalize_vgg16(fcn: FCN, vgg_state: dict[str, torch.Tensor]) -> FCN:
    """Copy VGG16's convs into fcn.features and reshape fc6/fc7 into 7x7 and 1x1 kernels."""
    expected = [f"features.{i}.{p}" for i in VGG16_CONV_INDICES for p in ("weight", "bias")]
    expected += [
        "classifier.0.weight",
        "classifier.0.bias",
        "classifier.3.weight",
        "classifier.3.bias",
    ]
    missing = [k for k in expected if k not in vgg_state]
    if missing:
        raise ValueError(
            f"not a VGG16 state dict: missing {missing[:4]}{'...' if len(missing) > 4 else ''}"
        )
    with torch.no_grad():
        for i in VGG16_CONV_INDICES:
            conv = fcn.features.layers[i]
            conv.weight.copy_(vgg_state[f"features.{i}.weight"])
            conv.bias.copy_(vgg_state[f"features.{i}.bias"])
        fcn.head.fc6.weight.copy_(vgg_state["classifier.0.weight"].view(4096, 512, 7, 7))
        fcn.head.fc6.bias.copy_(vgg_state["classifier.0.bias"])
        fcn.head.fc7.weight.copy_(vgg_state["classifier.3.weight"].view(4096, 4096, 1, 1))
        fcn.head.fc7.bias.copy_(vgg_state["classifier.3.bias"])
    return fcn
