"""Images of known content classes, rendered here (nothing downloaded), for the ``auto`` budget's
tests, benchmark and docs (not used by the plugin).

Six classes, all deterministic for a given size and seed:

* ``flat``: a solid colour; ``gradient``: a gentle two-colour ramp; ``noise``: mid grey with mild
  Gaussian pixel noise (std 2/255, below what anyone calls content);
* ``photo``: a photograph bundled with scikit-image, resized to the size asked for;
* ``text``: a page of dense paragraphs (DejaVu Sans from matplotlib's own fonts) at a font size;
* ``chart``: a matplotlib bar or line chart with title, axis labels, ticks and a legend;
* ``ui``: a screenshot-like window: title bar, sidebar menu, buttons, text fields, a table.

:data:`CLASSES` maps each class to its renderer ``(width, height, variant) -> PIL.Image``;
:func:`gallery` lists ``(class, variant, image)`` for a size.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

#: Photographs bundled with scikit-image (no download); the grey ones are repeated in RGB.
PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon")

_WORDS = (
    "the of and to in is was for that with as on by at from his are were this which be or an had "
    "not but have their one all they been has more its who new also two into time other after "
    "first would over these can only some when between about state city system since under "
    "during while model token image vision language budget energy spectrum server request "
    "placeholder encoder processor pixel matrix energy rank count ratio cache layer engine batch"
).split()


@lru_cache(maxsize=32)
def _font(size: int, mono: bool = False) -> ImageFont.FreeTypeFont:
    from matplotlib import font_manager

    path = font_manager.findfont("DejaVu Sans Mono" if mono else "DejaVu Sans",
                                 fallback_to_default=True)
    return ImageFont.truetype(path, size)


def flat(width: int, height: int, color: tuple[int, int, int] = (200, 205, 210)) -> Image.Image:
    """One solid colour."""
    return Image.new("RGB", (width, height), color)


def gradient(width: int, height: int, lo: tuple[int, int, int] = (90, 120, 170),
             hi: tuple[int, int, int] = (170, 190, 220)) -> Image.Image:
    """A gentle diagonal ramp from ``lo`` (top left) to ``hi`` (bottom right), like a sky."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    t = (x / max(1, width - 1) + y / max(1, height - 1)) / 2
    img = np.asarray(lo, np.float64) + t[..., None] * (np.asarray(hi) - np.asarray(lo))
    return Image.fromarray(np.round(img).astype(np.uint8))


def noise(width: int, height: int, sigma: float = 2.0, seed: int = 0,
          level: int = 128) -> Image.Image:
    """Mid grey plus i.i.d. Gaussian noise of ``sigma`` grey levels (of 255) per pixel."""
    rng = np.random.default_rng(seed)
    img = level + rng.normal(0.0, sigma, size=(height, width, 3))
    return Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8))


def photo(width: int, height: int, name: str = "astronaut") -> Image.Image:
    """A scikit-image photograph (:data:`PHOTOS`), resized (bicubic) to ``width`` x ``height``."""
    import skimage.data as skdata

    arr = np.asarray(getattr(skdata, name)())
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    img = Image.fromarray(arr[:, :, :3].astype(np.uint8))
    return img.resize((width, height), Image.BICUBIC)


def text_page(width: int, height: int, font_size: int = 16, seed: int = 0) -> Image.Image:
    """Black text on white: a heading and justified-looking paragraphs of pseudo-random words
    filling the page, margins of ~4% of the width."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    margin = max(4, width // 25)
    font = _font(font_size)
    head = _font(int(font_size * 1.6))
    line_h = int(font_size * 1.35)
    y = margin
    draw.text((margin, y), "Section 3. Budgets that follow content", fill=(0, 0, 0), font=head)
    y += int(font_size * 2.4)
    while y + line_h < height - margin:
        words: list[str] = []
        x_max = width - 2 * margin
        while True:
            word = _WORDS[int(rng.integers(len(_WORDS)))]
            if draw.textlength(" ".join([*words, word]), font=font) > x_max:
                break
            words.append(word)
        draw.text((margin, y), " ".join(words), fill=(0, 0, 0), font=font)
        y += line_h
        if rng.random() < 0.12:  # paragraph break
            y += line_h // 2
    return img


def chart(width: int, height: int, kind: str = "bar", seed: int = 0) -> Image.Image:
    """A matplotlib chart (``kind`` "bar" or "line") with title, labels, ticks, grid and legend,
    rendered with the Agg backend at ``width`` x ``height`` pixels: the same 8-inch-wide figure
    at any size (the resolution, not the layout, follows the size, as a chart exported for a
    larger screen)."""
    from matplotlib.figure import Figure

    rng = np.random.default_rng(seed)
    dpi = width / 8.0
    fig = Figure(figsize=(8.0, 8.0 * height / width), dpi=dpi)
    ax = fig.add_subplot()
    labels = ["Q1", "Q2", "Q3", "Q4", "Q5", "Q6"]
    if kind == "bar":
        x = np.arange(len(labels))
        for i, name in enumerate(("north", "south", "east")):
            ax.bar(x + (i - 1) * 0.27, rng.uniform(20, 100, len(labels)), width=0.27, label=name)
        ax.set_xticks(x, labels)
    elif kind == "line":
        t = np.arange(40)
        for name in ("latency p50", "latency p90", "throughput"):
            ax.plot(t, np.cumsum(rng.normal(0, 1, t.size)) + rng.uniform(5, 15), label=name,
                    marker="o", markersize=3)
    else:
        raise ValueError(f"chart kind must be 'bar' or 'line', got {kind!r}")
    ax.set_title("Quarterly results by region (units sold, thousands)")
    ax.set_xlabel("period")
    ax.set_ylabel("value")
    ax.grid(True, alpha=0.4)
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    out = Image.open(buf).convert("RGB")
    return out if out.size == (width, height) else out.resize((width, height), Image.BICUBIC)


def ui_screenshot(width: int, height: int, seed: int = 0) -> Image.Image:
    """A settings-window-like screenshot: title bar, sidebar menu, form fields, buttons and a
    small table, on a light background; sizes scale with the image."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (width, height), (246, 247, 249))
    d = ImageDraw.Draw(img)
    s = max(1.0, width / 800)  # scale of the layout
    fs = max(9, int(13 * s))
    font, bold = _font(fs), _font(int(fs * 1.2))
    bar = int(34 * s)
    d.rectangle([0, 0, width, bar], fill=(45, 52, 64))
    d.text((int(12 * s), int(8 * s)), "Token budget settings", fill=(240, 240, 240), font=bold)
    for i, c in enumerate([(237, 94, 84), (244, 190, 79), (98, 197, 84)]):
        cx = width - int((20 + 22 * i) * s)
        d.ellipse([cx - int(6 * s), bar // 2 - int(6 * s), cx + int(6 * s), bar // 2 + int(6 * s)],
                  fill=c)
    side = int(180 * s)
    d.rectangle([0, bar, side, height], fill=(230, 233, 238))
    items = ["General", "Models", "Budgets", "Metrics", "Cache", "Logging", "Users", "About"]
    for i, name in enumerate(items):
        y = bar + int((14 + 30 * i) * s)
        if i == 2:
            d.rectangle([0, y - int(5 * s), side, y + int(22 * s)], fill=(200, 214, 240))
        d.text((int(16 * s), y), name, fill=(30, 30, 30), font=font)
    x0, y = side + int(24 * s), bar + int(20 * s)
    d.text((x0, y), "Budgets", fill=(20, 20, 20), font=_font(int(fs * 1.6)))
    y += int(44 * s)
    fields = ["Energy share", "Minimum fraction", "Maximum fraction", "Low detail tokens",
              "Max visual tokens", "Window"]
    field_w = int(220 * s)
    for name in fields:
        if y + int(30 * s) > height * 0.62:
            break
        d.text((x0, y + int(6 * s)), name, fill=(60, 60, 60), font=font)
        fx = x0 + int(170 * s)
        d.rounded_rectangle([fx, y, fx + field_w, y + int(28 * s)], radius=int(4 * s),
                            fill=(255, 255, 255), outline=(180, 185, 195))
        d.text((fx + int(8 * s), y + int(6 * s)), f"{rng.uniform(0, 1):.2f}", fill=(20, 20, 20),
               font=font)
        y += int(38 * s)
    bx = x0
    for label, fill, fg in [("Save", (37, 99, 235), (255, 255, 255)),
                            ("Cancel", (255, 255, 255), (40, 40, 40)),
                            ("Reset to defaults", (255, 255, 255), (40, 40, 40))]:
        w = int(draw_len(d, label, font) + 28 * s)
        d.rounded_rectangle([bx, y, bx + w, y + int(30 * s)], radius=int(6 * s), fill=fill,
                            outline=(150, 155, 165))
        d.text((bx + int(14 * s), y + int(7 * s)), label, fill=fg, font=font)
        bx += w + int(12 * s)
    y += int(48 * s)
    cols = ["request", "tokens", "kept", "reason"]
    cw = (width - x0 - int(24 * s)) // len(cols)
    rh = int(24 * s)
    d.rectangle([x0, y, x0 + cw * len(cols), y + rh], fill=(225, 229, 236))
    for j, c in enumerate(cols):
        d.text((x0 + j * cw + int(6 * s), y + int(5 * s)), c, fill=(20, 20, 20), font=bold)
    y += rh
    r = 0
    while y + rh < height - int(10 * s):
        if r % 2:
            d.rectangle([x0, y, x0 + cw * len(cols), y + rh], fill=(250, 250, 252))
        vals = [f"req-{int(rng.integers(1000, 9999))}", str(int(rng.integers(100, 3000))),
                str(int(rng.integers(20, 900))), ["ratio", "auto", "cap", "detail"][r % 4]]
        for j, v in enumerate(vals):
            d.text((x0 + j * cw + int(6 * s), y + int(5 * s)), v, fill=(40, 40, 40), font=font)
        y += rh
        r += 1
    return img


def draw_len(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont) -> float:
    return float(draw.textlength(text, font=font))


#: Class name -> renderer ``(width, height, variant) -> image``; variants per class in
#: :data:`VARIANTS`.
CLASSES: dict[str, Callable[[int, int, str], Image.Image]] = {
    "flat": lambda w, h, v: flat(w, h),
    "gradient": lambda w, h, v: gradient(w, h),
    "noise": lambda w, h, v: noise(w, h, sigma=float(v)),
    "photo": lambda w, h, v: photo(w, h, v),
    "text": lambda w, h, v: text_page(w, h, font_size=int(v)),
    "chart": lambda w, h, v: chart(w, h, kind=v),
    "ui": lambda w, h, v: ui_screenshot(w, h, seed=int(v)),
}

#: The variants the tests and ``benchmarks/auto_budget.py`` render of each class.
VARIANTS: dict[str, tuple[str, ...]] = {
    "flat": ("solid",),
    "gradient": ("ramp",),
    "noise": ("2",),
    "photo": PHOTOS,
    "text": ("12", "16", "24"),
    "chart": ("bar", "line"),
    "ui": ("0", "1"),
}


def render(cls: str, width: int, height: int, variant: str | None = None) -> Image.Image:
    """The ``variant`` (default: the first of :data:`VARIANTS`) of class ``cls``."""
    if cls not in CLASSES:
        raise ValueError(f"unknown content class {cls!r}; known: {', '.join(CLASSES)}")
    return CLASSES[cls](width, height, variant if variant is not None else VARIANTS[cls][0])


def gallery(width: int, height: int,
            classes: tuple[str, ...] | None = None) -> list[tuple[str, str, Image.Image]]:
    """``(class, variant, image)`` for every variant of every class (or of ``classes``)."""
    return [(c, v, CLASSES[c](width, height, v))
            for c in (classes or tuple(CLASSES)) for v in VARIANTS[c]]
