"""Overlap-tile inference, as pure functions: where the tiles of a large image lie, the pixels
of one tile, and each tile's kept centre written into the image's label map.

A fully convolutional network computes every output pixel from a window of input around it
(FCN §3.1), so an image larger than one tile can run tile by tile at its own resolution and
give the labels the whole image would give, if each tile brings enough context (the halo)
around the part of it that is kept (U-Net's overlap-tile strategy, Ronneberger et al. §2).

Three rules make a tile see what the whole image's run sees around its kept centre:

- Tiles start on the network's downsampling lattice (multiples of the card's size divisor:
  16 for U-Net's four pools, 32 for FCN's five), so every pooling cell of a tile is a cell of
  the whole image's run. FCN's 100-px input pad and its fixed crops are relative to a tile's
  top-left corner, so on the lattice they align too.
- An axis no longer than one tile runs whole; on a longer axis the last tile is shifted back
  inside the image and ends where the image ends, so the image's own border (and whatever
  the network does there: U-Net repeats its edge pixels up to a multiple of 16, FCN pads
  100 zeros) is where the whole image's run has it.
- Consecutive tiles overlap by at least twice the halo; the seam between them is in the
  middle of the overlap, so each kept pixel has at least `halo` pixels of real context on
  every side that is not the image's border.

Nothing here is image-sized but the caller's pixels and labels: a tile's pixels are a copy
of its window (a few hundred kB), and its labels go straight into the label map.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from segserve.contracts.card import ModelCard
from segserve.service.media.imaging import fit_size


@dataclass(frozen=True)
class Span:
    """One tile along one axis: the window [start, stop) the network sees and the part
    [keep_start, keep_stop) of it whose labels are kept, in image coordinates."""

    start: int
    stop: int
    keep_start: int
    keep_stop: int


@dataclass(frozen=True)
class Tile:
    """One tile of an image: its window and kept part along each axis."""

    rows: Span
    cols: Span

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the window the network sees."""
        return self.rows.stop - self.rows.start, self.cols.stop - self.cols.start

    @property
    def pixels(self) -> int:
        h, w = self.size
        return h * w


@dataclass(frozen=True)
class TileGrid:
    """How one image of `image` (H, W) runs in tiles of at most `tile` x `tile`."""

    image: tuple[int, int]
    tile: int
    halo: int
    tiles: tuple[Tile, ...]

    @property
    def count(self) -> int:
        return len(self.tiles)

    @property
    def computed_pixels(self) -> int:
        """Pixels the network computes for the image, halos included."""
        return sum(t.pixels for t in self.tiles)


class TilingError(ValueError):
    """A tile size or halo that cannot work: no kept core left, or off the lattice."""


def round_up(n: int, divisor: int) -> int:
    return -(-n // divisor) * divisor


def axis_spans(length: int, tile: int, halo: int, divisor: int) -> list[Span]:
    """The tiles along one axis of `length` pixels: windows of `tile` starting on multiples
    of `divisor`, consecutive ones `tile - 2 * halo` apart, the last shifted back to end at
    `length`; the seams in the middle of each overlap. One window when the axis fits."""
    if length <= tile or round_up(length, divisor) <= tile:
        return [Span(0, length, 0, length)]
    step = tile - 2 * halo
    if step < divisor:
        raise TilingError(f"a {tile}-px tile with a {halo}-px halo keeps no {divisor}-px core")
    if tile % divisor or step % divisor:
        raise TilingError(f"tiles of {tile} px stepping {step} px are off the {divisor}-px lattice")
    last = round_up(length, divisor) - tile  # the lattice point whose window covers the end
    starts = list(range(0, last, step)) + [last]
    spans = []
    for i, start in enumerate(starts):
        stop = min(start + tile, length)
        keep_start = 0 if i == 0 else (starts[i - 1] + tile + start) // 2
        keep_stop = length if i == len(starts) - 1 else (start + tile + starts[i + 1]) // 2
        spans.append(Span(start, stop, keep_start, keep_stop))
    return spans


def plan_tiles(image: tuple[int, int], tile: int, halo: int, divisor: int) -> TileGrid:
    """Every tile of an (H, W) image, row by row."""
    rows = axis_spans(image[0], tile, halo, divisor)
    cols = axis_spans(image[1], tile, halo, divisor)
    return TileGrid(image, tile, halo, tuple(Tile(r, c) for r in rows for c in cols))


def tile_pixels(rgb: np.ndarray, tile: Tile) -> np.ndarray:
    """A contiguous copy of the tile's window of an H x W x 3 image."""
    r, c = tile.rows, tile.cols
    return np.ascontiguousarray(rgb[r.start : r.stop, c.start : c.stop])


def keep_centre(labels: np.ndarray, tile_labels: np.ndarray, tile: Tile) -> None:
    """Write the kept part of one tile's labels (its window's size) into the image's."""
    r, c = tile.rows, tile.cols
    labels[r.keep_start : r.keep_stop, c.keep_start : c.keep_stop] = tile_labels[
        r.keep_start - r.start : r.keep_stop - r.start,
        c.keep_start - c.start : c.keep_stop - c.start,
    ]


@dataclass(frozen=True)
class ScalePlan:
    """How one request's images meet the network: `policy` native (own resolution; past
    `whole_pixels`, in tiles of `tile` with `halo`) or fit (scaled down to `fit_pixels`)."""

    policy: str
    fit_pixels: int
    tile: int
    halo: int
    divisor: int
    whole_pixels: int = 0  # native images up to this many pixels (and tile**2) run whole

    @classmethod
    def for_card(
        cls,
        card: ModelCard,
        policy: str | None,
        tile: int,
        fit_pixels: int | None = None,
        whole_pixels: int = 0,
    ) -> ScalePlan:
        """A model's plan: `policy` (default: the card's), the server's `tile` side (unless
        the card names one), `fit_pixels` (default: the card's), and the most pixels an
        image may have to run whole (at least a tile's). ValueError for a policy the card
        does not offer."""
        policy = policy or card.scale_policy
        if policy not in card.scale_policies:
            raise ValueError(
                f"scale={policy} is not offered by {card.name} "
                f"(its card allows {', '.join(card.scale_policies)})"
            )
        side = effective_tile(card.tile_size or tile, card.tile_halo, card.size_divisor)
        return cls(
            policy,
            fit_pixels or card.fit_pixels,
            side,
            card.tile_halo,
            card.size_divisor,
            max(whole_pixels, side * side),
        )

    def inference_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(H, W) the network sees an (H, W) image at, tiles put together."""
        return size if self.policy == "native" else fit_size(size, self.fit_pixels)

    def grid(self, size: tuple[int, int]) -> TileGrid | None:
        """The tiles of an image at inference size `size`, or None when it runs whole."""
        if self.policy != "native" or size[0] * size[1] <= max(self.whole_pixels, self.tile**2):
            return None
        return plan_tiles(size, self.tile, self.halo, self.divisor)


def effective_tile(tile: int, halo: int, divisor: int) -> int:
    """`tile` on the lattice (rounded down to `divisor`), raised to four times the halo where
    the halo needs it, so that at least half of each tile's side is kept."""
    divisor = max(divisor, 1)
    return max(tile // divisor * divisor, round_up(4 * halo, divisor), divisor)
