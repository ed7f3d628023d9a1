"""Comic pages: panels and captions laid out on one image (Pillow).

Geometry, for ``n`` panels of ``w x h`` in ``columns`` columns::

    rows = ceil(n / columns)
    cell = w x (h + caption_height)     caption_height = 0 without captions
    page = (columns * w + (columns + 1) * margin) x (rows * cell_h + (rows + 1) * margin)

Panel ``i`` goes to row ``i // columns`` and column ``i % columns``, mirrored for right-to-left
reading (manga).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

READING_ORDERS = ("left_to_right", "right_to_left")


def panel_origin(index: int, columns: int, width: int, cell_height: int, margin: int, order: str) -> tuple[int, int]:
    """Top-left pixel of panel ``index`` on the page."""
    if order not in READING_ORDERS:
        raise ValueError(f"unknown reading order {order!r}; expected one of {list(READING_ORDERS)}")
    row, column = divmod(index, columns)
    if order == "right_to_left":
        column = columns - 1 - column
    return margin + column * (width + margin), margin + row * (cell_height + margin)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def wrap(text: str, font, width: int, draw: ImageDraw.ImageDraw) -> list[str]:
    """Greedy word wrap of ``text`` to lines no wider than ``width`` pixels (a long word gets its own line)."""
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(candidate, font=font) <= width:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines


def comic_page(panels: torch.Tensor, captions: Sequence[str], columns: int = 3, margin: int = 16,
               caption_size: int = 20, order: str = "left_to_right", border: int = 2,
               background: tuple[int, int, int] = (255, 255, 255)) -> torch.Tensor:
    """Lay ``panels`` (IMAGE ``(n, h, w, 3)`` in [0, 1]) out as one page ``(1, H, W, 3)``.

    ``captions`` (one per panel, missing or empty ones leave the space blank) go under the panels."""
    n, h, w, _ = panels.shape
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    font = _font(caption_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [wrap(captions[i], font, w, probe) if i < len(captions) else [] for i in range(n)]
    line_height = int(caption_size * 1.25)
    most_lines = max((len(lines) for lines in wrapped), default=0)
    caption_height = most_lines * line_height + (margin // 2 if most_lines else 0)
    cell_height = h + caption_height
    page = Image.new("RGB", (columns * w + (columns + 1) * margin, rows * cell_height + (rows + 1) * margin),
                     background)
    draw = ImageDraw.Draw(page)
    pixels = (panels.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    for i in range(n):
        x, y = panel_origin(i, columns, w, cell_height, margin, order)
        page.paste(Image.fromarray(pixels[i]), (x, y))
        if border:
            draw.rectangle((x - border, y - border, x + w + border - 1, y + h + border - 1), outline=(0, 0, 0),
                           width=border)
        for line_number, line in enumerate(wrapped[i]):
            draw.text((x, y + h + margin // 2 + line_number * line_height), line, fill=(0, 0, 0), font=font)
    return torch.from_numpy(np.asarray(page, dtype=np.float32) / 255.0)[None]
