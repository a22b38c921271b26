"""Pure functions from an image's bytes to its RGB pixels: the header checked before any
pixel is decoded, large images decoded straight to the size the network runs at.

No torch, no I/O beyond the bytes given; every failure is a typed error the HTTP layer maps
to a 4xx. The way back, labels to bytes, is render.py's.
"""

from __future__ import annotations

import io
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from segserve.errors import UserError

# What a segmentation service is sent. Pillow reads some forty formats; every other decoder
# (JPEG 2000, DDS, PSD, FITS, ...) is attack surface and slow paths nobody needs here.
DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
EXIF_ORIENTATION = 0x0112


class ImageDecodeError(UserError, ValueError):
    """Not an image, or a corrupt / truncated one (HTTP 400)."""


class ImageTooLarge(UserError, ValueError):
    """More pixels than the limit allows (HTTP 413): checked from the header, before decoding."""


class UnsupportedFormat(UserError, ValueError):
    """An image in a format the server does not accept (HTTP 415)."""


@dataclass(frozen=True)
class Probe:
    """What an image's header says, before any pixel is decoded."""

    format: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def sniff_format(data: bytes) -> str | None:
    """The format Pillow would take `data` for, from the first bytes alone (no parsing)."""
    Image.init()
    prefix = data[:16]
    for fmt in Image.ID:
        accept = Image.OPEN[fmt][1]
        if accept is not None and accept(prefix):
            return fmt
    return None


@contextmanager
def _decoding_errors(formats: tuple[str, ...], max_pixels: int):
    """Every failure of a decoder, typed: whatever Pillow raises becomes a 4xx, never a 500."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except (ImageTooLarge, ImageDecodeError, UnsupportedFormat):
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own, larger bound tripped first
        raise ImageTooLarge(f"image is over the {max_pixels}-pixel limit ({exc})") from exc
    except MemoryError as exc:
        raise ImageTooLarge("image too large to decode in the memory allowed") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(f"not an image in a format we read ({', '.join(formats)})") from exc
    except Exception as exc:  # noqa: BLE001 - decoders raise anything (NotImplementedError, ...)
        raise ImageDecodeError(f"corrupt or unreadable image: {type(exc).__name__}: {exc}") from exc


def open_image(
    data: bytes, max_pixels: int, formats: tuple[str, ...] = DEFAULT_FORMATS
) -> tuple[Image.Image, Probe]:
    """Open lazily and check the header: format allowed, size within `max_pixels`."""
    if not data:
        raise ImageDecodeError("empty body: no image bytes")
    with _decoding_errors(formats, max_pixels):
        try:
            image = Image.open(io.BytesIO(data), formats=list(formats))
        except UnidentifiedImageError:
            found = sniff_format(data)
            if found is not None and found not in formats:
                raise UnsupportedFormat(
                    f"{found} images are not accepted; send one of {', '.join(formats)}"
                ) from None
            raise
        w, h = image.size
        if w * h > max_pixels:
            raise ImageTooLarge(
                f"image is {w}x{h} = {w * h} pixels, over the {max_pixels}-pixel limit"
            )
        if w < 1 or h < 1:
            raise ImageDecodeError(f"image has no pixels ({w}x{h})")
        return image, Probe(image.format or "?", w, h)


def fit_size(size: tuple[int, int], max_pixels: int | None) -> tuple[int, int]:
    """(H, W) scaled down, aspect kept, to at most `max_pixels` (None: unchanged)."""
    height, width = size
    if max_pixels is None or width * height <= max_pixels:
        return height, width
    scale = (max_pixels / (width * height)) ** 0.5
    return max(1, int(height * scale)), max(1, int(width * scale))


def decode_image(
    data: bytes,
    max_pixels: int,
    formats: tuple[str, ...] = DEFAULT_FORMATS,
    fit_pixels: int | None = None,
) -> np.ndarray:
    """An allowed format to an H x W x 3 uint8 RGB array: at the image's own size, or scaled
    down to at most `fit_pixels` (a JPEG is then decoded at a reduced scale directly).

    JPEG (progressive, CMYK, EXIF orientation), PNG (palette, grey, 16-bit, alpha), WebP,
    BMP, TIFF, the first frame of a GIF or the first page of a TIFF. The pixel count is
    checked from the header before any pixel is decoded, so a decompression bomb costs
    nothing.
    """
    image, probe = open_image(data, max_pixels, formats)
    return decode_opened(image, probe, fit_pixels, formats)


def decode_opened(
    image: Image.Image,
    probe: Probe,
    fit_pixels: int | None = None,
    formats: tuple[str, ...] = DEFAULT_FORMATS,
) -> np.ndarray:
    """The pixels of an image `open_image` opened (see `decode_image`)."""
    with _decoding_errors(formats, probe.pixels):
        h, w = fit_size((probe.height, probe.width), fit_pixels)
        pil_size = (w, h)  # Pillow's sizes are (width, height)
        if pil_size != (probe.width, probe.height) and probe.format == "JPEG":
            image.draft("RGB", pil_size)  # libjpeg decodes at 1/2, 1/4 or 1/8 scale itself
        image.seek(0)  # first frame of an animation, first page of a TIFF
        image.load()
        if image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
            pil_size = (h, w)  # the EXIF rotation swaps width and height
        ImageOps.exif_transpose(image, in_place=True)  # no copy when there is no rotation
        image = _shrink_towards(image, pil_size)
        rgb_image = _to_rgb_image(image)
        if rgb_image.size != pil_size:
            rgb_image = rgb_image.resize(pil_size, Image.Resampling.BILINEAR, reducing_gap=2.0)
        return np.asarray(rgb_image, dtype=np.uint8)


# Modes Image.reduce takes; others (palette, bilevel) are shrunk after conversion.
REDUCIBLE = ("L", "LA", "RGB", "RGBA", "CMYK", "I", "F")


def _shrink_towards(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """A large image shrunk by the largest whole factor that stays above `target` (Pillow's
    (width, height)), in its own mode, before it becomes RGB: a 36 MP grey PNG never exists
    as 36 MP of RGB (measured, it was most of a soak's peak; docs/benchmarks.md)."""
    factor = min(image.width // target[0], image.height // target[1])
    if factor < 2:
        return image
    if image.mode.startswith("I;16"):
        image = image.convert("I")  # 32-bit, reducible, the top 8 bits kept later
    elif image.mode not in REDUCIBLE:
        image = image.convert("L" if image.mode == "1" else "RGB")
    return image.reduce(factor)


def _to_rgb_image(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey: keep the top 8 bits instead of letting convert() clip at 255.
        grey = np.asarray(image, dtype=np.uint32)
        top = int(grey.max()) if grey.size else 0
        shift = 8 if top > 255 else 0
        return Image.fromarray((grey >> shift).clip(0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode != "RGB":
        image = image.convert("RGB")  # CMYK, L, LA, RGBA (alpha dropped), P, F, ...
    return image


def resize_rgb(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    if rgb.shape[:2] == (height, width):
        return rgb
    return np.asarray(
        Image.fromarray(rgb, "RGB").resize((width, height), Image.Resampling.BILINEAR)
    )
