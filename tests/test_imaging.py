"""Pure decode and encode functions, on real image bytes of every format."""

import io

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from segserve.contracts.palette import voc_palette
from segserve.service.imaging import (
    ImageDecodeError,
    ImageTooLarge,
    class_stats,
    decode_image,
    decode_rle,
    encode_label_png,
    encode_mask_png,
    encode_rle,
    overlay,
)

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
    [("PNG", {}), ("BMP", {}), ("TIFF", {}), ("WEBP", {"lossless": True}), ("JPEG", {"quality": 95}),
     ("JPEG", {"quality": 95, "progressive": True}), ("GIF", {})],
)  # fmt: skip
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
    assert len(png_bomb) < 2_000_000  # a 30000 x 30000 PNG: under 1 MB sent, 900 MP decoded
    with pytest.raises(ImageTooLarge, match="pixel limit"):
        decode_image(png_bomb, LIMIT)
    small_bomb = encode(Image.new("L", (5000, 4000)), "PNG")
    with pytest.raises(ImageTooLarge, match="5000x4000"):
        decode_image(small_bomb, 10_000_000)


def test_label_png_is_mode_p_with_the_palette_and_exact_size():
    labels = np.random.default_rng(0).integers(0, 4, (33, 51)).astype(np.uint8)
    palette = [[0, 0, 0], [10, 20, 30], [40, 50, 60], [70, 80, 90]]
    image = Image.open(io.BytesIO(encode_label_png(labels, palette)))
    assert image.mode == "P" and image.size == (51, 33)
    assert np.array_equal(np.asarray(image), labels)
    assert image.getpalette()[3:12] == [10, 20, 30, 40, 50, 60, 70, 80, 90]
    assert image.getpalette()[255 * 3 : 256 * 3] == voc_palette()[255]


def test_masks_decode_back_to_the_label_map():
    labels = np.random.default_rng(1).integers(0, 3, (17, 23)).astype(np.uint8)
    labels[0, 0] = 1  # a run that starts with the class
    for cid in range(3):
        mask = labels == cid
        png = Image.open(io.BytesIO(encode_mask_png(mask)))
        assert png.mode == "1" and np.array_equal(np.asarray(png), mask)
        rle = encode_rle(mask)
        assert np.array_equal(decode_rle(rle), mask)
        # The real COCO decoder reads it too.
        coco = coco_mask.frPyObjects(rle, *rle["size"])
        assert np.array_equal(coco_mask.decode(coco).astype(bool), mask)


def test_overlay_blends_only_foreground_and_class_stats_count():
    rgb = np.full((4, 4, 3), 100, np.uint8)
    labels = np.zeros((4, 4), np.uint8)
    labels[0, 0] = 1
    out = overlay(rgb, labels, [[0, 0, 0], [200, 0, 0]])
    assert out[1, 1].tolist() == [100, 100, 100] and out[0, 0].tolist() == [150, 50, 50]
    assert class_stats(labels, 3).tolist() == [15, 1, 0]
