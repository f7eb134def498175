"""Implicit-concept overlays: QR codes, watermarks and overlaid text.

Each overlay takes an RGB image and a numpy Generator and returns
``(new_image, boxes)`` where ``boxes`` is a list of ``[x1, y1, x2, y2]`` integer
pixel boxes (inclusive-exclusive, clipped to the image) around what was drawn.
The boxes are the geometric prior Geom-Erasing feeds the model as location
tokens, so they must be tight and never empty.

Sizes are proportional to the image side, calibrated at 256 px (the numbers in
comments refer to that size).  The placement statistics imitate web-scraped
data: QR codes sit in corners, watermarks span the picture, captions sit in
top/bottom bands.
"""
from __future__ import annotations

import functools
import math
import string
from pathlib import Path
from typing import Callable

import numpy as np
import qrcode
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "Box",
    "add_qr",
    "add_watermark",
    "add_text",
    "CONCEPTS",
    "CONCEPT_NAMES",
    "font",
    "FONT_FILES",
    "SIZE_PROFILES",
    "overlay",
]

Box = list[int]
Overlay = Callable[[Image.Image, np.random.Generator], tuple[Image.Image, list[Box]]]

_FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONT_FILES: tuple[str, ...] = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSansCondensed-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerifCondensed-Italic.ttf",
    "DejaVuSansMono-Bold.ttf",
)


@functools.lru_cache(maxsize=256)
def font(name: str | None, size: float) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Load a DejaVu font by file name (None: PIL's built-in font), falling back to PIL's built-in font.

    The fallback keeps the dataset buildable on machines without DejaVu; it
    changes the look (one face only) but not the box semantics.
    """
    size = max(int(size), 4)
    if name is not None and (_FONT_DIR / name).exists():
        return ImageFont.truetype(str(_FONT_DIR / name), size)
    return ImageFont.load_default(size=size)


def _clip_box(box: tuple[float, float, float, float], w: int, h: int) -> Box | None:
    x1, y1, x2, y2 = (int(math.floor(box[0])), int(math.floor(box[1])),
                      int(math.ceil(box[2])), int(math.ceil(box[3])))
    x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
    if x2 - x1 < 1 or y2 - y1 < 1:
        return None
    return [x1, y1, x2, y2]


def _luma(img: Image.Image, box: tuple[int, int, int, int] | None = None) -> float:
    """Mean luma of ``img`` (or of ``box`` in it); used to keep overlays visible."""
    region = img.crop(box) if box else img
    return float(np.asarray(region.convert("L"), np.float32).mean())


def _choice(rng: np.random.Generator, items: list | tuple, p: list[float] | None = None):
    """``rng.choice`` that returns the item itself (numpy would turn tuples into arrays)."""
    return items[int(rng.choice(len(items), p=p))]


# --------------------------------------------------------------------------- QR


def _qr_payload(rng: np.random.Generator) -> str:
    alnum = string.ascii_letters + string.digits
    token = "".join(_choice(rng, alnum) for _ in range(int(rng.integers(4, 12))))
    kind = rng.random()
    if kind < 0.55:
        host = "".join(_choice(rng, string.ascii_lowercase) for _ in range(int(rng.integers(3, 9))))
        tld = _choice(rng, ["com", "io", "net", "shop", "me", "co"])
        scheme = _choice(rng, ["https://", "http://", ""])
        return f"{scheme}{host}.{tld}/{token}"
    if kind < 0.8:
        return token.upper()
    return f"ID:{int(rng.integers(10**5, 10**9))}-{token}"


# Where QR codes land in scraped images; bottom-right dominates (product
# photos, posters), centre placements are rare.
_QR_SPOTS: tuple[str, ...] = ("br", "bl", "tr", "tl", "edge", "centre")
_QR_SPOT_P: list[float] = [0.36, 0.15, 0.13, 0.08, 0.20, 0.08]


def add_qr(img: Image.Image, rng: np.random.Generator,
           scale: tuple[float, float] = (0.16, 0.45)) -> tuple[Image.Image, list[Box]]:
    """Paste a real, decodable QR code (``qrcode`` package) onto ``img``.

    The side is ``scale`` of the image side, by default 16-45% (~40-115 px at 256;
    the ``wide`` profile of :data:`SIZE_PROFILES` goes down to 5%).  Modules are
    scaled by an integer factor when they are at least 2 px wide so OpenCV
    can decode them; smaller codes are resized with nearest-neighbour.
    """
    w, h = img.size
    side_px = min(w, h)
    ec = _choice(rng, [qrcode.constants.ERROR_CORRECT_L, qrcode.constants.ERROR_CORRECT_M,
                       qrcode.constants.ERROR_CORRECT_Q])
    qr = qrcode.QRCode(error_correction=ec, box_size=1, border=0)
    qr.add_data(_qr_payload(rng))
    qr.make(fit=True)
    modules = np.array(qr.get_matrix(), dtype=bool)
    quiet = int(rng.integers(1, 3))  # real codes often have a thin quiet zone
    grid = np.pad(modules, quiet, constant_values=False)
    n = grid.shape[0]

    target = rng.uniform(*scale) * side_px
    mod_px = target / n
    if mod_px >= 2:
        k = int(round(mod_px))
        arr = np.kron(grid, np.ones((k, k), dtype=bool))
    else:
        arr = grid
    dark_rgb, light_rgb = (0, 0, 0), (255, 255, 255)
    style = rng.random()
    if style < 0.04:  # inverted codes appear in dark-themed designs (OpenCV cannot decode them)
        dark_rgb, light_rgb = light_rgb, (10, 10, 10)
    elif style < 0.14:
        dark_rgb = _choice(rng, [(20, 30, 90), (90, 15, 20), (15, 70, 30), (50, 20, 70)])
    rgb = np.where(arr[..., None], np.array(dark_rgb, np.uint8), np.array(light_rgb, np.uint8))
    code = Image.fromarray(rgb.astype(np.uint8), "RGB")
    if mod_px < 2:
        s = max(int(round(target)), n)
        code = code.resize((s, s), Image.NEAREST)
    s = code.size[0]
    s = min(s, w, h)
    code = code.crop((0, 0, s, s))

    spot = _choice(rng, _QR_SPOTS, p=_QR_SPOT_P)
    margin = lambda: int(rng.uniform(0.0, 0.06) * side_px)  # noqa: E731
    if spot == "centre":
        x = int((w - s) / 2 + rng.uniform(-0.15, 0.15) * w)
        y = int((h - s) / 2 + rng.uniform(-0.15, 0.15) * h)
    elif spot == "edge":
        along = rng.uniform(0.15, 0.85)
        side = _choice(rng, ["top", "bottom", "left", "right"])
        if side in ("top", "bottom"):
            x = int(along * (w - s))
            y = margin() if side == "top" else h - s - margin()
        else:
            y = int(along * (h - s))
            x = margin() if side == "left" else w - s - margin()
    else:
        x = margin() if spot[1] == "l" else w - s - margin()
        y = margin() if spot[0] == "t" else h - s - margin()
    x, y = int(np.clip(x, 0, w - s)), int(np.clip(y, 0, h - s))
    out = img.copy()
    out.paste(code, (x, y))
    box = _clip_box((x, y, x + s, y + s), w, h)
    return out, [box] if box else []


# --------------------------------------------------------------------- watermark

_SYLLABLES = ("pix", "foto", "stock", "ima", "gra", "lum", "vi", "sta", "lens", "snap", "cre",
              "ato", "nova", "hub", "shot", "zen", "ri", "mo", "ka", "tel", "dream", "vid")


def _brand(rng: np.random.Generator) -> str:
    name = "".join(_choice(rng, _SYLLABLES) for _ in range(int(rng.integers(2, 4))))
    style = rng.random()
    if style < 0.25:
        name = name.upper()
    elif style < 0.5:
        name = name.capitalize()
    deco = rng.random()
    if deco < 0.3:
        return f"\u00a9 {name}"
    if deco < 0.5:
        return f"{name}.{_choice(rng, ['com', 'net', 'io'])}"
    if deco < 0.6:
        return f"{name} images"
    return name


def _text_layer(text: str, fnt, fill: tuple[int, int, int, int], logo: str | None,
                stroke: int = 0) -> Image.Image:
    """Render text (plus an optional outline logo) on a tight transparent layer."""
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    l, t, r, b = probe.textbbox((0, 0), text, font=fnt, stroke_width=stroke)
    th = b - t
    logo_w = int(th * 1.2) if logo else 0
    pad = 2 + stroke
    layer = Image.new("RGBA", (r - l + logo_w + 2 * pad, th + 2 * pad), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    if logo:
        lw = max(1, th // 8)
        shape = [pad, pad, pad + th, pad + th]
        if logo == "circle":
            d.ellipse(shape, outline=fill, width=lw)
        else:
            d.rectangle(shape, outline=fill, width=lw)
    d.text((pad + logo_w - l, pad - t), text, font=fnt, fill=fill, stroke_width=stroke)
    return layer


def paste_marks(size: tuple[int, int], placements: list[tuple[Image.Image, int, int]], min_share: float,
                alpha_floor: int = 0) -> tuple[Image.Image, list[Box]]:
    """Paste watermark layers at ``(layer, x, y)`` onto one transparent ``size`` overlay (opaque marks,
    so overlapping tiles do not stack); returns it and one box per pasted mark.

    A mark's box is the bounding box of its pixels with alpha above ``alpha_floor``, clipped to the
    frame. Slivers at the border carry almost no watermark: a mark keeping less than ``min_share`` of
    its box inside the frame is left out, of the overlay and of the boxes."""
    w, h = size
    overlay = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    boxes: list[Box] = []
    for lay, x, y in placements:
        alpha = lay.getchannel("A")
        bb = (alpha.point(lambda v: 255 if v > alpha_floor else 0) if alpha_floor else alpha).getbbox()
        if bb is None:
            continue
        box = _clip_box((x + bb[0], y + bb[1], x + bb[2], y + bb[3]), w, h)
        if box is None or (box[2] - box[0]) * (box[3] - box[1]) < min_share * (bb[2] - bb[0]) * (bb[3] - bb[1]):
            continue
        # alpha_composite rejects negative offsets, so crop the layer to the frame.
        cx, cy = max(0, -x), max(0, -y)
        overlay.alpha_composite(lay.crop((cx, cy, lay.width, lay.height)), (x + cx, y + cy))
        boxes.append(box)
    return overlay, boxes


def add_watermark(img: Image.Image, rng: np.random.Generator, scale: tuple[float, float] = (0.08, 0.15),
                  tiled_scale: tuple[float, float] = (0.045, 0.08),
                  opacity: tuple[float, float] = (0.25, 0.6)) -> tuple[Image.Image, list[Box]]:
    """Overlay a semi-transparent brand watermark, single or tiled.

    Single (55%): one large mark near the centre, rotated up to 30 degrees, font size ``scale`` of
    the side; tiled (45%): a staggered diagonal grid of smaller marks (``tiled_scale``) across the
    whole image, one box per tile.  Opacity ``opacity`` (default 0.25-0.6) in white, black or grey.
    """
    w, h = img.size
    side = min(w, h)
    text = _brand(rng)
    grey = int(rng.integers(110, 170))
    # White marks dominate on the web, but a white mark on a white picture
    # would carry a box with nothing visible in it; pick by brightness.
    luma = _luma(img)
    if luma > 190:
        rgb = _choice(rng, [(0, 0, 0), (grey - 60,) * 3])
    elif luma < 60:
        rgb = _choice(rng, [(255, 255, 255), (grey + 60,) * 3])
    else:
        rgb = _choice(rng, [(255, 255, 255), (0, 0, 0), (grey, grey, grey)], p=[0.5, 0.25, 0.25])
    alpha = int(round(rng.uniform(*opacity) * 255))
    fill = (*rgb, 255)  # opacity applied to the whole layer below, so overlaps don't stack
    fname = _choice(rng, FONT_FILES)
    logo = _choice(rng, [None, None, "circle", "rect"])

    if rng.random() < 0.55:
        fnt = font(fname, rng.uniform(*scale) * side)
        layer = _text_layer(text, fnt, fill, logo)
        # Shrink overly long brands so a single mark fits the frame.
        if layer.width > 0.9 * w:
            fnt = font(fname, fnt.size * 0.9 * w / layer.width)
            layer = _text_layer(text, fnt, fill, logo)
        layer = layer.rotate(float(rng.uniform(-30, 30)), resample=Image.BICUBIC, expand=True)
        x = int((w - layer.width) / 2 + rng.uniform(-0.1, 0.1) * w)
        y = int((h - layer.height) / 2 + rng.uniform(-0.2, 0.2) * h)
        placements = [(layer, x, y)]
    else:
        fnt = font(fname, rng.uniform(*tiled_scale) * side)
        angle = float(rng.uniform(20, 45) * _choice(rng, [1, -1]))
        layer = _text_layer(text, fnt, fill, logo).rotate(angle, resample=Image.BICUBIC, expand=True)
        step_x = int(layer.width * rng.uniform(1.1, 1.5)) + 1
        step_y = int(layer.height * rng.uniform(1.2, 1.8)) + 1
        ox, oy = int(rng.integers(0, step_x)), int(rng.integers(0, step_y))
        placements = []
        for row, y in enumerate(range(-oy - step_y, h + step_y, step_y)):
            shift = (step_x // 2) * (row % 2)  # stagger rows, as stock sites do
            for x in range(-ox - step_x + shift, w + step_x, step_x):
                placements.append((layer, x, y))

    overlay, boxes = paste_marks((w, h), placements, min_share=0.1)
    a = overlay.getchannel("A").point(lambda v: v * alpha // 255)
    overlay.putalpha(a)
    out = Image.alpha_composite(img.convert("RGBA"), overlay).convert("RGB")
    return out, boxes


# -------------------------------------------------------------------------- text

_WORDS = ("when", "you", "finally", "get", "the", "weekend", "best", "day", "ever", "sale",
          "now", "open", "new", "limited", "offer", "me", "trying", "to", "be", "happy", "free",
          "shipping", "summer", "vibes", "big", "news", "coming", "soon", "only", "today",
          "nobody", "literally", "every", "monday", "this", "is", "fine", "just", "do", "it",
          "wait", "for", "friends", "love", "travel", "menu", "special", "hello", "world")

_TEXT_COLOURS: tuple[tuple[int, int, int], ...] = (
    (255, 255, 255), (0, 0, 0), (255, 230, 0), (230, 20, 20), (20, 60, 200), (255, 255, 255))


def _line(rng: np.random.Generator) -> str:
    words = [_choice(rng, _WORDS) for _ in range(int(rng.integers(1, 5)))]
    line = " ".join(words)
    style = rng.random()
    if style < 0.35:
        return line.upper()  # meme captions are usually upper case
    if style < 0.7:
        return line.capitalize()
    return line


def add_text(img: Image.Image, rng: np.random.Generator,
             scale: tuple[float, float] = (0.035, 0.155)) -> tuple[Image.Image, list[Box]]:
    """Draw 1-3 lines of caption/meme/subtitle text in a band; one tight box per line.

    Glyph size is ``scale`` of the side, by default 3.5-15.5% (9-40 px at 256; the
    ``wide`` profile of :data:`SIZE_PROFILES` goes down to 1.5%, ~4 px).  Bands: bottom 45%,
    top 40%, middle 15%.  A contrasting outline is added half the time.
    """
    w, h = img.size
    side = min(w, h)
    out = img.copy()
    draw = ImageDraw.Draw(out)
    fname = _choice(rng, FONT_FILES)
    px = rng.uniform(*scale) * side
    colour = _choice(rng, _TEXT_COLOURS)
    stroke = 0
    stroke_fill = (0, 0, 0) if sum(colour) > 380 else (255, 255, 255)
    if rng.random() < 0.5:
        stroke = max(1, int(round(px / 14)))
    n_lines = int(_choice(rng, [1, 2, 3], p=[0.5, 0.35, 0.15]))
    lines = [_line(rng) for _ in range(n_lines)]

    # Fit every line into 94% of the width by shrinking the font, never below
    # the smallest size (then drop words instead) so glyphs stay OCR-visible.
    min_px = scale[0] * side
    fnt = font(fname, px)
    for _ in range(8):
        widths = [draw.textbbox((0, 0), ln, font=fnt, stroke_width=stroke) for ln in lines]
        widest = max(b[2] - b[0] for b in widths)
        if widest <= 0.94 * w:
            break
        if fnt.size * 0.94 * w / widest >= min_px:
            fnt = font(fname, fnt.size * 0.94 * w / widest)
        else:
            fnt = font(fname, min_px)
            lines = [" ".join(ln.split()[: max(1, len(ln.split()) // 2)]) for ln in lines]

    # Low contrast against the band would make boxes around invisible text;
    # real overlays solve that with an outline, so force one.
    if abs(0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] - _luma(img)) < 70:
        stroke = max(1, int(round(fnt.size / 14)))
    metrics = [draw.textbbox((0, 0), ln, font=fnt, stroke_width=stroke) for ln in lines]
    line_h = int(max(b[3] - b[1] for b in metrics) * 1.25) + 1
    block_h = line_h * len(lines)
    band = _choice(rng, ["bottom", "top", "middle"], p=[0.45, 0.40, 0.15])
    pad = int(rng.uniform(0.02, 0.07) * h)
    if band == "top":
        y0 = pad
    elif band == "bottom":
        y0 = h - pad - block_h
    else:
        y0 = int((h - block_h) / 2 + rng.uniform(-0.1, 0.1) * h)
    y0 = max(0, min(y0, h - block_h))
    align = _choice(rng, ["center", "left", "right"], p=[0.7, 0.2, 0.1])

    boxes: list[Box] = []
    for i, (ln, m) in enumerate(zip(lines, metrics)):
        lw = m[2] - m[0]
        if align == "center":
            x = (w - lw) / 2
        elif align == "left":
            x = 0.04 * w
        else:
            x = 0.96 * w - lw
        # Shift by the bbox origin so the *glyphs*, not the pen position, land
        # where we planned; then measure the drawn box for the label.
        pos = (int(x - m[0]), int(y0 + i * line_h - m[1]))
        draw.text(pos, ln, font=fnt, fill=colour, stroke_width=stroke, stroke_fill=stroke_fill)
        box = _clip_box(draw.textbbox(pos, ln, font=fnt, stroke_width=stroke), w, h)
        if box:
            boxes.append(box)
    return out, boxes


CONCEPTS: dict[str, Overlay] = {"qr": add_qr, "watermark": add_watermark, "text": add_text}
CONCEPT_NAMES: dict[str, str] = {"qr": "qr code", "watermark": "watermark", "text": "text"}

# Overlay size profiles: per concept, keyword overrides of its ``add_*`` function (sizes as shares
# of the image side).  ``default`` is what the dataset has always used (the demo's data depends on
# it, byte for byte).  ``wide`` reaches below what the real detectors need at 256 px (OpenCV
# decodes a 21-module QR code from ~45-51 px, ~33 px with zbar; Tesseract reads ~9-10 px glyphs on
# clean backgrounds), so detector quality can be reported per size, including misses.  ``lowres``
# is for models that see the image at 64 px: at the default sizes a single watermark's strokes are
# 1 px and tiled marks 3-5 px tall there (unreadable to a scorer, ``benchmarks/results/erasing_cpu``),
# so marks are about twice as large and at least 0.35 opaque, and text glyphs at least 5 px.
# Concepts absent from a profile keep their default sizes.
SIZE_PROFILES: dict[str, dict[str, dict[str, tuple[float, float]]]] = {
    "default": {},
    "wide": {"qr": {"scale": (0.05, 0.45)}, "text": {"scale": (0.015, 0.155)}},
    "lowres": {"watermark": {"scale": (0.16, 0.26), "tiled_scale": (0.09, 0.13), "opacity": (0.35, 0.6)},
               "text": {"scale": (0.08, 0.2)}},
}


def overlay(concept: str, img: Image.Image, rng: np.random.Generator,
            sizes: str = "default") -> tuple[Image.Image, list[Box]]:
    """Apply ``concept``'s overlay with the size range of profile ``sizes``."""
    if sizes not in SIZE_PROFILES:
        raise ValueError(f"unknown size profile {sizes!r}; choose from {sorted(SIZE_PROFILES)}")
    return CONCEPTS[concept](img, rng, **SIZE_PROFILES[sizes].get(concept, {}))  # type: ignore[call-arg]
