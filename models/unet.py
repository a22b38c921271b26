"""U-Net (Ronneberger, Fischer, Brox, MICCAI 2015) with padded convolutions.

The paper's convs are unpadded and its output smaller than its input; a segmentation
service needs labels for every input pixel, so the 3x3 convs here pad by one, the input is
padded up to a multiple of 16 (four 2x2 pools) and the logits cropped back to H x W.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DEPTH = 4  # number of 2x2 pools; inputs are padded to a multiple of 2**DEPTH


def double_conv(in_ch: int, out_ch: int, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c_in in (in_ch, out_ch):
        # A conv followed by batch norm needs no bias of its own.
        layers.append(nn.Conv2d(c_in, out_ch, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_ch))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class UNet(nn.Module):
    """Contracting path width..16*width channels, 2x2 up-convs, concatenated skips, 1x1 out.

    width=64 is the paper (about 31 M parameters); 16 or 8 make CPU-sized models.
    """

    size_divisor = 2**DEPTH

    def __init__(self, num_classes: int, width: int = 64, batch_norm: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        chans = [width * 2**i for i in range(DEPTH + 1)]  # e.g. 64, 128, 256, 512, 1024
        self.down = nn.ModuleList([double_conv(3, chans[0], batch_norm)])
        self.down.extend(double_conv(chans[i], chans[i + 1], batch_norm) for i in range(DEPTH))
        self.up_convs = nn.ModuleList(
            nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2) for i in reversed(range(DEPTH))
        )
        self.up = nn.ModuleList(
            double_conv(2 * chans[i], chans[i], batch_norm) for i in reversed(range(DEPTH))
        )
        self.classifier = nn.Conv2d(chans[0], num_classes, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[2], image.shape[3]
        # Pad bottom/right to a multiple of 16 so every pool halves exactly; crop back at the
        # end. Edge pixels repeated, not zeros: an image edge that falls inside a pooling cell
        # and is followed by zeros made the net paint objects along the bottom and right edges
        # (2.1 % of the background there; 0.9 % with the edge repeated: docs/benchmarks.md).
        x = F.pad(image, (0, (-w) % self.size_divisor, 0, (-h) % self.size_divisor), "replicate")
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        skips.pop()  # the bottom of the U is not a skip
        for up_conv, block in zip(self.up_convs, self.up, strict=True):
            x = block(torch.cat([skips.pop(), up_conv(x)], dim=1))
        return self.classifier(x)[:, :, :h, :w]
