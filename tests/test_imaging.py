"""Pure decode functions, on real image bytes of every format."""

import io

import numpy as np
import pytest
from PIL import Image

from segserve.service.media.imaging import ImageDecodeError, ImageTooLarge, decode_image

LIMIT = 40_000_000


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def rgb():
    return (np.random.default_rng(0).random((45, 67, 3)) * 255).astype(np.uint8)


@pytest.mark.parametrize(
    "fmt, kw",
    [
        ("PNG", {}),
        ("BMP", {}),
        ("TIFF", {}),
        ("WEBP", {"lossless": True}),
        ("JPEG", {"quality": 95}),
        ("JPEG", {"quality": 95, "progressive": True}),
        ("GIF", {}),
    ],
)
def test_common_formats_decode_to_rgb_at_their_own_size(rgb, fmt, kw):
    image = Image.fromarray(rgb)
    if fmt == "GIF":
        image = image.quantize(64)
    out = decode_image(encode(image, fmt, **kw), LIMIT)
    assert out.shape == (45, 67, 3) and out.dtype == np.uint8
    if fmt in ("PNG", "BMP", "TIFF", "WEBP"):
        assert np.array_equal(out, rgb)


def test_png_variants_palette_grey_16bit_alpha(rgb):
    grey = decode_image(encode(Image.fromarray(rgb[..., 0], "L"), "PNG"), LIMIT)
    assert grey.shape == (45, 67, 3) and np.array_equal(grey[..., 0], rgb[..., 0])
    sixteen = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
    out16 = decode_image(encode(sixteen, "PNG"), LIMIT)
    assert np.abs(out16[..., 0].astype(int) - rgb[..., 0]).max() <= 1
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])
    assert np.array_equal(decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), LIMIT), rgb)
    pal = decode_image(encode(Image.fromarray(rgb).quantize(16), "PNG"), LIMIT)
    assert pal.shape == (45, 67, 3)


def test_cmyk_jpeg_and_exif_orientation(rgb):
    cmyk = decode_image(encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95), LIMIT)
    assert cmyk.shape == (45, 67, 3)
    image = Image.fromarray(rgb)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    rotated = decode_image(encode(image, "JPEG", exif=exif, quality=95), LIMIT)
    assert rotated.shape == (67, 45, 3)


def test_first_frame_of_an_animated_gif():
    frames = [Image.new("RGB", (20, 10), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out = decode_image(buf.getvalue(), LIMIT)
    assert out.shape == (10, 20, 3) and out[0, 0, 0] > 200 and out[0, 0, 2] < 50


@pytest.mark.parametrize("data", [b"", b"hello, not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_non_images_are_refused(data):
    with pytest.raises(ImageDecodeError):
        decode_image(data, LIMIT)


def test_truncated_and_corrupt_files_are_refused(rgb):
    jpeg = encode(Image.fromarray(rgb), "JPEG")
    with pytest.raises(ImageDecodeError):
        decode_image(jpeg[: len(jpeg) // 2], LIMIT)
    png = bytearray(encode(Image.fromarray(rgb), "PNG"))
    png[40] ^= 0xFF  # inside IHDR/IDAT: the CRC no longer matches
    with pytest.raises(ImageDecodeError):
        decode_image(bytes(png), LIMIT)


def test_pixel_limit_is_checked_before_decoding(png_bomb):
    assert len(png_bomb) < 2_000_000  # 20000 x 20000: under 1 MB sent, 400 MP decoded
    with pytest.raises(ImageTooLarge, match="pixel limit"):
        decode_image(png_bomb, LIMIT)
    small_bomb = encode(Image.new("L", (5000, 4000)), "PNG")
    with pytest.raises(ImageTooLarge, match="5000x4000"):
        decode_image(small_bomb, 10_000_000)
