"""Drawing kept tokens: kept patches bright, dropped ones dimmed; grids of methods x ratios
(offline, outside a server)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

#: Brightness left to a dropped patch.
DIM = 0.25
_BG = (255, 255, 255)
_FG = (0, 0, 0)


def overlay(image: Image.Image, kept: torch.Tensor | np.ndarray, h: int, w: int) -> Image.Image:
    """``image`` covered by an ``h`` x ``w`` token grid; ``kept`` (h*w,) bool, row-major."""
    img = np.asarray(image.convert("RGB"), dtype=np.float32)
    mask = np.asarray(kept, dtype=bool).reshape(h, w)
    ys = (np.arange(img.shape[0]) * h // img.shape[0]).clip(0, h - 1)
    xs = (np.arange(img.shape[1]) * w // img.shape[1]).clip(0, w - 1)
    pixel_kept = mask[ys][:, xs]
    out = np.where(pixel_kept[..., None], img, img * DIM)
    return Image.fromarray(out.round().astype(np.uint8))


def labelled(image: Image.Image, label: str) -> Image.Image:
    """``image`` under a one-line caption strip (unchanged when ``label`` is empty)."""
    if not label:
        return image
    strip = 14
    out = Image.new("RGB", (image.width, image.height + strip), _BG)
    ImageDraw.Draw(out).text((2, 1), label, fill=_FG)
    out.paste(image, (0, strip))
    return out


def hstack(images: Sequence[Image.Image], gap: int = 4, height: int | None = None) -> Image.Image:
    """Images side by side, scaled to one height, ``gap`` white pixels apart."""
    height = height or max(im.height for im in images)
    scaled = [im.resize((max(1, round(im.width * height / im.height)), height))
              for im in images]
    out = Image.new("RGB", (sum(im.width for im in scaled) + gap * (len(scaled) - 1), height),
                    _BG)
    x = 0
    for im in scaled:
        out.paste(im, (x, 0))
        x += im.width + gap
    return out


def grid(cells: Sequence[Sequence[Image.Image]], row_labels: Sequence[str],
         col_labels: Sequence[str], *, cell_height: int = 160, title: str = "",
         caption: str = "") -> Image.Image:
    """A labelled table of pictures: ``cells[r][c]`` under column ``c``, in row ``r``."""
    draw_probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = 14
    label_w = max([int(draw_probe.textlength(s)) for s in row_labels] + [0]) + 12
    scaled = [[c.resize((max(1, round(c.width * cell_height / c.height)), cell_height))
               for c in row] for row in cells]
    col_w = [max(row[c].width for row in scaled) for c in range(len(col_labels))]
    gap = 6
    top = (line + 6 if title else 0) + line + 4
    bottom = (line * (caption.count("\n") + 1) + 8) if caption else 0
    width = label_w + sum(col_w) + gap * len(col_w)
    height = top + len(scaled) * (cell_height + gap) + bottom
    out = Image.new("RGB", (width, height), _BG)
    d = ImageDraw.Draw(out)
    y = 2
    if title:
        d.text((4, y), title, fill=_FG)
        y += line + 6
    x = label_w
    for c, label in enumerate(col_labels):
        d.text((x + 2, y), label, fill=_FG)
        x += col_w[c] + gap
    y = top
    for r, row in enumerate(scaled):
        d.text((4, y + cell_height // 2 - line // 2), row_labels[r], fill=_FG)
        x = label_w
        for c, cell in enumerate(row):
            out.paste(cell, (x, y))
            x += col_w[c] + gap
        y += cell_height + gap
    if caption:
        d.multiline_text((4, y + 2), caption, fill=_FG, spacing=2)
    return out
