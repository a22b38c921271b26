"""A generated corpus of odd, broken and hostile image files, each with the status the
service must answer. Made by Pillow and byte surgery on real files: nothing downloaded."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def photo(h: int = 48, w: int = 64, seed: int = 0) -> Image.Image:
    rgb = (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
    return Image.fromarray(rgb)


def png_declaring(width: int, height: int) -> bytes:
    """A valid PNG whose IHDR (with a correct CRC) claims `width` x `height`."""
    data = bytearray(encode(Image.new("L", (8, 8)), "PNG"))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


def jpeg_declaring(width: int, height: int) -> bytes:
    """A real JPEG whose SOF0 marker claims `width` x `height`."""
    data = bytearray(encode(photo(8, 8), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def gif_declaring(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("P", (4, 4)), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)  # logical screen
    return bytes(data)


def bmp_declaring(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("RGB", (4, 4)), "BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def tiff_declaring(width: int, height: int) -> bytes:
    """A real TIFF whose ImageWidth and ImageLength tags claim `width` x `height`."""
    data = bytearray(encode(Image.new("L", (4, 4)), "TIFF"))
    for tag, value in ((256, width), (257, height)):
        for typ in (3, 4):  # SHORT or LONG
            pos = data.find(struct.pack("<HHI", tag, typ, 1))
            if pos >= 0:  # the entry: tag, type, count, value; rewritten as one LONG
                data[pos : pos + 12] = struct.pack("<HHII", tag, 4, 1, value)
                break
    return bytes(data)


def multipage_tiff() -> bytes:
    pages = [photo(40, 30, s) for s in range(3)]
    return encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (20, 10), c) for c in ((255, 0, 0), (0, 0, 255))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:])


def palette_alpha_png() -> bytes:
    image = photo(30, 30).quantize(8)
    image.info["transparency"] = 0
    return encode(image, "PNG", transparency=0)


def cases() -> dict[str, tuple[bytes, int]]:
    """name -> (bytes, the status the service must answer)."""
    jpeg = encode(photo(), "JPEG", quality=90)
    png = encode(photo(), "PNG")
    return {
        # Odd but valid: answered.
        "cmyk.jpg": (encode(photo().convert("CMYK"), "JPEG"), 200),
        "progressive.jpg": (encode(photo(), "JPEG", progressive=True), 200),
        "grey16.png": (encode(Image.fromarray(np.full((20, 30), 40000, np.uint16)), "PNG"), 200),
        "palette_alpha.png": (palette_alpha_png(), 200),
        "grey_alpha.png": (encode(photo().convert("LA"), "PNG"), 200),
        "bilevel.png": (encode(photo().convert("1"), "PNG"), 200),
        "animated.gif": (animated_gif(), 200),
        "multipage.tif": (multipage_tiff(), 200),
        "float32.tif": (encode(Image.fromarray(np.ones((10, 12), np.float32)), "TIFF"), 200),
        "lossless.webp": (encode(photo(), "WEBP", lossless=True), 200),
        "bgr.bmp": (encode(photo(), "BMP"), 200),
        "one_pixel.png": (encode(Image.new("RGB", (1, 1)), "PNG"), 200),
        # Broken: 400.
        "empty": (b"", 400),
        "truncated.jpg": (jpeg[: len(jpeg) // 3], 400),
        "truncated.png": (png[: len(png) // 2], 400),
        "png_magic_jpeg_body": (png[:8] + jpeg[8:], 400),
        "jpeg_magic_garbage": (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8, 400),
        "random.bin": (
            np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
            400,
        ),
        "text.jpg": (b"this is a text file named .jpg\n" * 20, 400),
        "html": (b"<!doctype html><html><body>hello</body></html>", 400),
        "zero_size.png": (png_declaring(0, 0), 400),
        # Declaring more pixels than allowed, in a few bytes: 413 from the header alone.
        "huge.png": (png_declaring(60_000, 60_000), 413),
        "huge.jpg": (jpeg_declaring(65_000, 65_000), 413),
        "huge.gif": (gif_declaring(65_535, 65_535), 413),
        "huge.bmp": (bmp_declaring(40_000, 40_000), 413),
        "huge.tif": (tiff_declaring(50_000, 50_000), 413),
        # Images in formats the server does not take: 415, naming the format.
        "image.tga": (encode(photo(), "TGA"), 415),
        "image.pcx": (encode(photo(), "PCX"), 415),
        "image.ico": (encode(photo(32, 32), "ICO"), 415),
        "image.dds": (encode(photo(32, 32).convert("RGBA"), "DDS"), 415),
        "image.ppm": (encode(photo(), "PPM"), 415),
    }
