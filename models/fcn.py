"""FCN-32s / FCN-16s / FCN-8s on VGG16 (Long, Shelhamer, Darrell, CVPR 2015).

Follows the authors' Caffe nets (fcn.berkeleyvision.org, voc-fcn*s/net.py):
conv1_1 pads by 100 so that any input, even 1x1, survives the five pools and the 7x7 fc6;
max-pools round up (ceil mode); the score maps are aligned to each other and to the input
by the same fixed crop offsets as the original (5 for pool4, 9 for pool3, 19/27/31 for the
final 32x/16x/8x outputs).
"""

from __future__ import annotations

import torch
from torch import nn

# (out_channels, convs in block) for VGG16's five blocks; a 2x2 max-pool ends each block.
VGG16_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


def bilinear_kernel(channels: int, kernel_size: int) -> torch.Tensor:
    """Weights of a transposed conv that upsamples each channel bilinearly (no mixing)."""
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    og = torch.arange(kernel_size, dtype=torch.float64)
    filt1d = 1 - (og - center).abs() / factor
    filt = filt1d[:, None] * filt1d[None, :]
    weight = torch.zeros(channels, channels, kernel_size, kernel_size, dtype=torch.float64)
    weight[range(channels), range(channels)] = filt
    return weight.float()


def bilinear_upsampler(channels: int, factor: int, learnable: bool) -> nn.ConvTranspose2d:
    """A transposed conv initialised to bilinear interpolation by `factor` (kernel 2*factor)."""
    up = nn.ConvTranspose2d(channels, channels, 2 * factor, stride=factor, bias=False)
    with torch.no_grad():
        up.weight.copy_(bilinear_kernel(channels, 2 * factor))
    up.weight.requires_grad_(learnable)
    return up


def crop_like(x: torch.Tensor, offset: int, ref: torch.Tensor) -> torch.Tensor:
    """Caffe's Crop layer: x[..., offset:offset+H, offset:offset+W] with H, W taken from ref."""
    return x[:, :, offset : offset + ref.shape[2], offset : offset + ref.shape[3]]


class VGG16Features(nn.Module):
    """VGG16's 13 convs and 5 pools, returning pool3, pool4 and pool5 for the skips."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        self.pool_indices: list[int] = []
        for block, (out_ch, n_convs) in enumerate(VGG16_BLOCKS):
            for i in range(n_convs):
                # The 100-pixel pad on the very first conv is the paper's trick for any input size.
                pad = 100 if (block == 0 and i == 0) else 1
                layers += [nn.Conv2d(in_ch, out_ch, 3, padding=pad), nn.ReLU(inplace=True)]
                in_ch = out_ch
            layers.append(nn.MaxPool2d(2, stride=2, ceil_mode=True))
            self.pool_indices.append(len(layers) - 1)
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pools = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i in self.pool_indices[2:]:
                pools.append(x)
        pool3, pool4, pool5 = pools
        return pool3, pool4, pool5


class FCNHead(nn.Module):
    """fc6 (7x7x4096) and fc7 (1x1x4096) convolutionalised, each with ReLU and dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.fc6 = nn.Conv2d(512, 4096, 7)
        self.fc7 = nn.Conv2d(4096, 4096, 1)
        self.drop6 = nn.Dropout2d(0.5)
        self.drop7 = nn.Dropout2d(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop6(torch.relu(self.fc6(x)))
        return self.drop7(torch.relu(self.fc7(x)))


# voc-fcn8s-atonce: pool4 and pool3 are scaled by fixed constants before their scores, so
# that all three streams start on the same footing when trained at once rather than staged.
AT_ONCE_SKIP_SCALES = {"pool4": 0.01, "pool3": 0.0001}


class FCN(nn.Module):
    """The three FCN variants; `stride` 32, 16 or 8 picks how many skips are fused.

    Every score layer starts at zero, as in the authors' nets (Caffe's default filler):
    score_fr, and score_pool4 / score_pool3, so a net built from a coarser one computes
    exactly what that one did until training moves the new weights. `at_once` (FCN-16s/8s
    trained in one go, voc-fcn8s-atonce) scales the skips by fixed constants.
    """

    def __init__(self, num_classes: int, stride: int = 8, at_once: bool = False) -> None:
        super().__init__()
        if stride not in (32, 16, 8):
            raise ValueError(f"FCN stride must be 32, 16 or 8, not {stride}")
        self.stride = stride
        self.num_classes = num_classes
        self.at_once = at_once and stride < 32
        scales = AT_ONCE_SKIP_SCALES if self.at_once else {"pool4": 1.0, "pool3": 1.0}
        self.pool4_scale, self.pool3_scale = scales["pool4"], scales["pool3"]
        self.features = VGG16Features()
        self.head = FCNHead()
        self.score_fr = nn.Conv2d(4096, num_classes, 1)
        nn.init.zeros_(self.score_fr.weight)
        nn.init.zeros_(self.score_fr.bias)
        if stride <= 16:
            self.score_pool4 = nn.Conv2d(512, num_classes, 1)
            self.upscore2 = bilinear_upsampler(num_classes, 2, learnable=True)
            nn.init.zeros_(self.score_pool4.weight)
            nn.init.zeros_(self.score_pool4.bias)
        if stride == 8:
            self.score_pool3 = nn.Conv2d(256, num_classes, 1)
            self.upscore_pool4 = bilinear_upsampler(num_classes, 2, learnable=True)
            nn.init.zeros_(self.score_pool3.weight)
            nn.init.zeros_(self.score_pool3.bias)
        # The final upsampling stays fixed to bilinear, as in the paper (section 4.2).
        self.upscore = bilinear_upsampler(num_classes, stride, learnable=False)
        # Offsets of the original nets' final Crop layer for 32s / 16s / 8s.
        self.final_offset = {32: 19, 16: 27, 8: 31}[stride]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        pool3, pool4, pool5 = self.features(image)
        score = self.score_fr(self.head(pool5))
        if self.stride <= 16:
            score = self.upscore2(score)
            score = score + crop_like(self.score_pool4(pool4 * self.pool4_scale), 5, score)
        if self.stride == 8:
            score = self.upscore_pool4(score)
            score = score + crop_like(self.score_pool3(pool3 * self.pool3_scale), 9, score)
        return crop_like(self.upscore(score), self.final_offset, image)


def fcn_from_coarser(coarser: FCN, stride: int) -> FCN:
    """Staged training (paper, section 4.2): FCN-16s from FCN-32s, FCN-8s from FCN-16s.

    Copies every weight the finer net shares with the coarser one; the new skip scores
    stay zero, so the new net's output equals the coarser net's at the start.
    """
    if stride >= coarser.stride:
        raise ValueError(f"FCN-{stride}s cannot be initialised from FCN-{coarser.stride}s")
    finer = FCN(coarser.num_classes, stride)
    shared = {k: v for k, v in coarser.state_dict().items() if not k.startswith("upscore.")}
    missing, unexpected = finer.load_state_dict(shared, strict=False)
    assert not unexpected, unexpected
    return finer
