"""A legend image for people: one swatch per class with its id and name."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw, ImageFont

ROW = 22


def legend_png(class_names: list[str], palette: list[list[int]]) -> bytes:
    font = ImageFont.load_default()
    width = (
        40
        + max(
            int(
                ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(
                    f"{len(class_names)}  {n}", font=font
                )
            )
            for n in class_names
        )
        + 16
    )
    image = Image.new("RGB", (max(width, 120), ROW * len(class_names) + 8), "white")
    draw = ImageDraw.Draw(image)
    for i, name in enumerate(class_names):
        y = 4 + i * ROW
        draw.rectangle((6, y + 2, 30, y + ROW - 4), fill=tuple(palette[i]), outline=(80, 80, 80))
        draw.text((40, y + 4), f"{i}  {name}", fill=(0, 0, 0), font=font)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
