"""A wide family of watermarks over photo-like backgrounds: the training data of the shipped
watermark detector (``geomerase.core.detectors_real``, weights in ``geomerase/weights/detectors/``).

The ICD's watermark rule (:func:`geomerase.data.concepts.add_watermark`: syllable brand names in 8
DejaVu faces, white/black/grey, opacity 0.25-0.6, one centred mark or a diagonal tiling) is kept
*out* of this family, so a detector trained here can be scored on ICD-rule watermarks it never
saw (``benchmarks/watermark_detector.py``). This family draws

* marks: text (credits, stock-site phrases, URLs, years, random words), logos (rings, discs,
  squares, triangles, stars, camera and play symbols; outline or filled) or a logo beside text;
  in the DejaVu faces the ICD does not use and Pillow's built-in font;
* layouts: one mark anywhere at any angle (5-30% of the side), a corner credit, or a tiling at
  any angle and spacing (3-10% of the side);
* opacity ``Recipe.min_opacity``-0.6, in white, black, grey or a colour, with an optional outline
  or shadow;
* backgrounds: crops of scikit-image photos that the evaluation does not use, smooth random
  colour fields, gradients with blurred shapes, and ICD scenes; the ``v2`` recipe also augments the
  photo crops (scale, flips, quarter turns, colour, contrast, gamma, blur) and adds procedural
  photo-like textures (:func:`texture`: 1/f noise, blobs, stripes and checkers, fine grain).

A :class:`Recipe` sets the mix (the share of clean images, the faintest mark, the backgrounds, a
JPEG round trip); :data:`RECIPES` names the ones built so far. One ground-truth box per drawn mark (the
bounding box of its visible pixels).
"""
from __future__ import annotations

import io
import math
import string
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from geomerase.data.concepts import _FONT_DIR, FONT_FILES, Box, _choice, font, paste_marks

#: DejaVu faces the ICD rule does not use (the ICD's are ``concepts.FONT_FILES``); ``None`` is
#: Pillow's built-in font.
TRAIN_FONTS: tuple[str | None, ...] = tuple(
    sorted(p.name for p in _FONT_DIR.glob("DejaVu*.ttf") if p.name not in FONT_FILES)) + (None,)
#: scikit-image photos used as training backgrounds; ``benchmarks/text_detectors.PHOTOS`` (the
#: evaluation's) are not among them.
TRAIN_PHOTOS = ("rocket", "stereo_motorcycle", "coins", "clock", "cell", "colorwheel")


@dataclass(frozen=True)
class Recipe:
    """The training mix of the wide family."""

    clean_share: float = 0.5
    """Share of images without a mark."""
    min_opacity: float = 0.1
    """Opacity of the faintest mark (the strongest is 0.6)."""
    photo_share: float = 0.45
    """Share of backgrounds cropped from :data:`TRAIN_PHOTOS`."""
    texture_share: float = 0.0
    """Share of backgrounds that are procedural textures (:func:`texture`); the rest are smooth
    fields, blurred shapes and ICD scenes in proportions 4:4:3."""
    augment: bool = False
    """Photo crops take 10-100% of the side (else 30-100%), quarter turns, both flips, colour,
    contrast, gamma and blur jitter (:func:`augmented_photo`)."""
    jpeg_share: float = 0.0
    """Share of finished images (mark included) that go through a JPEG round trip at quality 30-95."""


#: ``v1``: the shipped detector's mix; ``v2``: more and more varied clean photo-like images, no
#: marks fainter than 0.15 (issue 15; scored on real photographs in
#: ``benchmarks/results/watermark_detector_cpu.md``, not shipped).
RECIPES: dict[str, Recipe] = {
    "v1": Recipe(),
    "v2": Recipe(clean_share=0.6, min_opacity=0.15, photo_share=0.45, texture_share=0.3, augment=True,
                 jpeg_share=0.3),
}
_WORDS = ("photo", "preview", "sample", "proof", "draft", "copyright", "studio", "images", "pictures",
          "archive", "licensed", "media", "creative", "press", "agency", "collection", "do not copy")


def _word(rng: np.random.Generator) -> str:
    n = int(rng.integers(3, 10))
    w = "".join(_choice(rng, string.ascii_lowercase) for _ in range(n))
    return w.upper() if rng.random() < 0.3 else (w.capitalize() if rng.random() < 0.5 else w)


def mark_text(rng: np.random.Generator) -> str:
    """A credit line, stock phrase, URL, year or random word."""
    kind = rng.random()
    if kind < 0.2:
        return f"\u00a9 {int(rng.integers(1995, 2027))} {_word(rng)}"
    if kind < 0.35:
        return f"Photo by {_word(rng)} {_word(rng)}"
    if kind < 0.5:
        return f"www.{_word(rng).lower()}.{_choice(rng, ['org', 'de', 'fr', 'co.uk', 'photo', 'art'])}"
    if kind < 0.7:
        return _choice(rng, _WORDS).upper() if rng.random() < 0.5 else _choice(rng, _WORDS)
    if kind < 0.85:
        return f"{_word(rng)} {_choice(rng, _WORDS)}"
    return _word(rng)


def _logo(d: ImageDraw.ImageDraw, x: int, y: int, s: int, fill: tuple, rng: np.random.Generator) -> None:
    kind = _choice(rng, ["ring", "disc", "square", "triangle", "star", "camera", "play"])
    lw = max(1, s // int(rng.integers(6, 12)))
    filled = rng.random() < 0.4
    box = [x, y, x + s, y + s]
    if kind in ("ring", "disc"):
        d.ellipse(box, fill=fill if kind == "disc" or filled else None, outline=fill, width=lw)
    elif kind == "square":
        d.rounded_rectangle(box, radius=s // 5, fill=fill if filled else None, outline=fill, width=lw)
    elif kind in ("triangle", "play"):
        pts = [(x, y), (x + s, y + s / 2), (x, y + s)] if kind == "play" else [(x + s / 2, y), (x + s, y + s), (x, y + s)]
        d.polygon(pts, fill=fill if filled else None, outline=fill, width=lw)
    elif kind == "star":
        pts = [(x + s / 2 + (s / 2 if i % 2 == 0 else s / 5) * math.cos(math.pi * i / 5 - math.pi / 2),
                y + s / 2 + (s / 2 if i % 2 == 0 else s / 5) * math.sin(math.pi * i / 5 - math.pi / 2)) for i in range(10)]
        d.polygon(pts, fill=fill if filled else None, outline=fill, width=lw)
    else:  # camera: body, lens, viewfinder bump
        d.rounded_rectangle([x, y + s // 4, x + s, y + s], radius=s // 8, outline=fill, width=lw)
        d.ellipse([x + s // 4, y + s // 3 + s // 8, x + 3 * s // 4, y + s - s // 8], outline=fill, width=lw)
        d.rectangle([x + s // 3, y + s // 8, x + 2 * s // 3, y + s // 4], fill=fill)


def mark_layer(rng: np.random.Generator, px: float, fill: tuple[int, int, int, int]) -> Image.Image:
    """One mark (text, logo, or logo + text) at glyph size ``px`` on a tight transparent layer."""
    kind = _choice(rng, ["text", "logo", "both"], p=[0.5, 0.15, 0.35])
    fnt = font(_choice(rng, TRAIN_FONTS), max(px, 5))
    text = mark_text(rng) if kind != "logo" else ""
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    stroke = int(rng.integers(0, 2))
    l, t, r, b = probe.textbbox((0, 0), text or "x", font=fnt, stroke_width=stroke)
    th = max(b - t, 4)
    logo_s = int(th * rng.uniform(1.0, 2.5)) if kind != "text" else 0
    tw = (r - l) if text else 0
    pad = 2 + stroke
    layer = Image.new("RGBA", (tw + logo_s + (th // 3 if text and logo_s else 0) + 2 * pad, max(th, logo_s) + 2 * pad))
    d = ImageDraw.Draw(layer)
    if logo_s:
        _logo(d, pad, pad, logo_s, fill, rng)
    if text:
        x0 = pad + logo_s + (th // 3 if logo_s else 0)
        d.text((x0 - l, pad + (max(th, logo_s) - th) // 2 - t), text, font=fnt, fill=fill, stroke_width=stroke)
    return layer


def _colour(rng: np.random.Generator, luma: float) -> tuple[int, int, int]:
    kind = rng.random()
    if kind < 0.15:
        return tuple(int(v) for v in rng.integers(0, 256, 3))
    if luma > 170:
        return _choice(rng, [(0, 0, 0), (60, 60, 60), (255, 255, 255)], p=[0.5, 0.35, 0.15])
    if luma < 80:
        return _choice(rng, [(255, 255, 255), (200, 200, 200), (0, 0, 0)], p=[0.6, 0.3, 0.1])
    return _choice(rng, [(255, 255, 255), (0, 0, 0), (128, 128, 128)], p=[0.55, 0.25, 0.2])


def _placements(rng: np.random.Generator, layer_fn: Callable[[float], Image.Image], w: int, h: int) -> list[tuple[Image.Image, int, int]]:
    side = min(w, h)
    layout = _choice(rng, ["single", "corner", "tiled"], p=[0.45, 0.2, 0.35])
    if layout == "tiled":
        lay = layer_fn(rng.uniform(0.03, 0.1) * side)
        lay = lay.rotate(float(rng.uniform(-90, 90)), resample=Image.BICUBIC, expand=True)
        sx = int(lay.width * rng.uniform(1.05, 2.0)) + 1
        sy = int(lay.height * rng.uniform(1.1, 2.5)) + 1
        ox, oy, shift = int(rng.integers(0, sx)), int(rng.integers(0, sy)), int(rng.integers(0, sx))
        return [(lay, x + (shift * (row % 2)), y) for row, y in enumerate(range(-oy - sy, h + sy, sy))
                for x in range(-ox - sx, w + sx, sx)]
    px = rng.uniform(0.05, 0.3) * side if layout == "single" else rng.uniform(0.03, 0.08) * side
    lay = layer_fn(px)
    if lay.width > 0.95 * w:
        lay = lay.resize((int(0.95 * w), max(1, int(lay.height * 0.95 * w / lay.width))), Image.BICUBIC)
    if layout == "single" and rng.random() < 0.7:
        lay = lay.rotate(float(rng.uniform(-90, 90)), resample=Image.BICUBIC, expand=True)
    if layout == "corner":
        m = int(rng.uniform(0.01, 0.05) * side)
        x = m if rng.random() < 0.4 else w - lay.width - m
        y = h - lay.height - m if rng.random() < 0.7 else m
    else:
        x = int(rng.uniform(-0.1, 1.0) * max(1, w - lay.width))
        y = int(rng.uniform(-0.1, 1.0) * max(1, h - lay.height))
    return [(lay, x, y)]


def add_wide_watermark(img: Image.Image, rng: np.random.Generator,
                       min_opacity: float = 0.1) -> tuple[Image.Image, list[Box]]:
    """Overlay one watermark of the wide family (module docstring) at opacity ``min_opacity``-0.6;
    returns the image and a box per mark."""
    w, h = img.size
    luma = float(np.asarray(img.convert("L"), np.float32).mean())
    fill = (*_colour(rng, luma), 255)
    placements = _placements(rng, lambda px: mark_layer(rng, px, fill), w, h)  # a tiling repeats one mark
    overlay, boxes = paste_marks((w, h), placements, min_share=0.25, alpha_floor=40)
    alpha = rng.uniform(min_opacity, 0.6)
    style = rng.random()
    a = overlay.getchannel("A").point(lambda v: int(v * alpha))
    if style < 0.2:  # a soft dark shadow under the mark, as embossed marks have
        shadow = Image.new("RGBA", (w, h), (0, 0, 0, 0))
        shadow.putalpha(a.filter(ImageFilter.GaussianBlur(max(1.0, min(w, h) / 200))))
        img = Image.alpha_composite(img.convert("RGBA"), shadow.transform(
            (w, h), Image.AFFINE, (1, 0, -1, 0, 1, -1))).convert("RGB")
    overlay.putalpha(a)
    return Image.alpha_composite(img.convert("RGBA"), overlay).convert("RGB"), boxes


# ------------------------------------------------------------------------------ backgrounds
def training_photos() -> list[np.ndarray]:
    """RGB uint8 arrays of :data:`TRAIN_PHOTOS` (scikit-image's bundled samples)."""
    import skimage.data as data

    out = []
    for name in TRAIN_PHOTOS:
        a = getattr(data, name)()
        a = a[0] if isinstance(a, tuple) else a
        out.append(np.stack([a] * 3, -1) if a.ndim == 2 else a[:, :, :3])
    return out


def _smooth_field(rng: np.random.Generator, size: int) -> Image.Image:
    """Colour noise at a few octaves, upsampled smoothly: skies, foliage, walls."""
    acc = np.zeros((size, size, 3), np.float32)
    base = rng.uniform(0, 255, 3)
    for octave, amp in ((4, 50.0), (16, 20.0), (64, 8.0)):
        small = rng.normal(0, 1, (octave, octave, 3)).astype(np.float32)
        up = np.asarray(Image.fromarray(((small + 4) * 32).clip(0, 255).astype(np.uint8)).resize(
            (size, size), Image.BICUBIC), np.float32) / 32 - 4
        acc += amp * up
    return Image.fromarray((base + acc).clip(0, 255).astype(np.uint8))


def _shapes_field(rng: np.random.Generator, size: int) -> Image.Image:
    """A gradient with blurred ellipses and rectangles: out-of-focus scenes."""
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
    img = Image.fromarray(np.broadcast_to(c0 + (c1 - c0) * t, (size, size, 3)).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 12))):
        x0, y0 = rng.uniform(-0.2, 1, 2) * size
        s = rng.uniform(0.05, 0.5, 2) * size
        col = tuple(int(v) for v in rng.integers(0, 256, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)([x0, y0, x0 + s[0], y0 + s[1]], fill=col)
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 6) * size / 256))


def _photo_crop(rng: np.random.Generator, a: np.ndarray, size: int) -> Image.Image:
    """A crop of 30-100% of the shorter side of ``a``, resized to ``size``, maybe mirrored."""
    h, w = a.shape[:2]
    side = int(min(h, w) * rng.uniform(0.3, 1.0))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    img = Image.fromarray(a[y:y + side, x:x + side]).resize((size, size), Image.BICUBIC)
    return img.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img


def augmented_photo(rng: np.random.Generator, a: np.ndarray, size: int) -> Image.Image:
    """A crop of 10-100% of the shorter side of ``a`` (RGB uint8), turned by a random quarter turn,
    maybe flipped both ways, resized to ``size``, with per-channel gain 0.8-1.25, saturation 0-1.4,
    contrast 0.5-1.5, gamma 0.6-1.7, brightness +-30 and, for a third, a Gaussian blur."""
    h, w = a.shape[:2]
    side = max(8, int(min(h, w) * rng.uniform(0.1, 1.0)))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = np.rot90(a[y:y + side, x:x + side], int(rng.integers(4)))
    crop = crop[:, ::-1] if rng.random() < 0.5 else crop
    crop = crop[::-1] if rng.random() < 0.5 else crop
    f = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.BICUBIC), np.float32) / 255
    f = f * rng.uniform(0.8, 1.25, 3).astype(np.float32)
    grey = f.mean(-1, keepdims=True)
    f = grey + (f - grey) * rng.uniform(0.0, 1.4)
    f = f.mean() + (f - f.mean()) * rng.uniform(0.5, 1.5)
    f = np.clip(f, 0, 1) ** rng.uniform(0.6, 1.7) + rng.uniform(-30, 30) / 255
    img = Image.fromarray((f.clip(0, 1) * 255).round().astype(np.uint8))
    if rng.random() < 0.33:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 2.0) * size / 256))
    return img


def _palette(rng: np.random.Generator, field: np.ndarray) -> np.ndarray:
    """``field`` (H, W) in [0, 1] -> RGB float between two or three random colours."""
    cols = rng.uniform(0, 255, (int(rng.integers(2, 4)), 3)).astype(np.float32)
    t = field[..., None] * (len(cols) - 1)
    i = np.clip(t.astype(int), 0, len(cols) - 2)
    return cols[i[..., 0]] + (cols[i[..., 0] + 1] - cols[i[..., 0]]) * (t - i)


def _pink(rng: np.random.Generator, size: int, beta: float) -> np.ndarray:
    """A (size, size) field with power spectrum 1/f^beta, scaled to [0, 1]."""
    fy, fx = np.fft.fftfreq(size)[:, None], np.fft.rfftfreq(size)[None, :]
    amp = 1 / np.maximum(np.hypot(fy, fx), 1 / size) ** (beta / 2)
    spec = amp * (rng.normal(size=amp.shape) + 1j * rng.normal(size=amp.shape))
    f = np.fft.irfft2(spec, s=(size, size)).astype(np.float32)
    return (f - f.min()) / max(float(f.max() - f.min()), 1e-6)


def _blobs(rng: np.random.Generator, size: int) -> np.ndarray:
    """Many small sharp or soft ellipses and polygons over a flat colour: gravel, leaves, crowds."""
    img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
    d = ImageDraw.Draw(img)
    base, spread = rng.uniform(0, 255, 3), rng.uniform(10, 120)
    for _ in range(int(rng.integers(30, 300))):
        x0, y0 = rng.uniform(-0.05, 1, 2) * size
        s = rng.uniform(0.01, 0.12, 2) * size
        col = tuple(int(v) for v in (base + rng.normal(0, spread, 3)).clip(0, 255))
        if rng.random() < 0.6:
            d.ellipse([x0, y0, x0 + s[0], y0 + s[1]], fill=col)
        else:
            d.polygon([(x0 + rng.uniform(0, s[0]), y0 + rng.uniform(0, s[1])) for _ in range(int(rng.integers(3, 7)))], fill=col)
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 3.0) * size / 256))
    return np.asarray(img, np.float32)


def _stripes(rng: np.random.Generator, size: int) -> np.ndarray:
    """Stripes or a checker at any angle and period, sine or square, maybe warped by smooth noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    ang, period = rng.uniform(0, np.pi), rng.uniform(3, 0.25 * size)
    u = (xx * np.cos(ang) + yy * np.sin(ang)) / period
    if rng.random() < 0.5:
        u = u + _pink(rng, size, 3.0) * rng.uniform(0, 3)
    wave = np.sin(2 * np.pi * u)
    if rng.random() < 0.4:  # checker
        wave = wave * np.sin(2 * np.pi * (-xx * np.sin(ang) + yy * np.cos(ang)) / period)
    if rng.random() < 0.5:
        wave = np.sign(wave)
    return _palette(rng, (wave + 1) / 2)


def texture(rng: np.random.Generator, size: int) -> Image.Image:
    """A procedural photo-like ``size`` x ``size`` RGB texture: 1/f^beta colour noise (beta 0.8-3,
    skies to foliage), many blobs, stripes or checkers, or fine grain over a 1/f field; half get
    a second, weaker layer of fine grain."""
    kind = _choice(rng, ["pink", "blobs", "stripes", "grain"], p=[0.4, 0.25, 0.15, 0.2])
    if kind == "pink":
        beta = rng.uniform(0.8, 3.0)
        f = _palette(rng, _pink(rng, size, beta))
        f = f + (np.stack([_pink(rng, size, beta) for _ in range(3)], -1) - 0.5) * rng.uniform(0, 80)
    elif kind == "blobs":
        f = _blobs(rng, size)
    elif kind == "stripes":
        f = _stripes(rng, size)
    else:
        f = _palette(rng, _pink(rng, size, rng.uniform(1.5, 3.0))) + rng.normal(0, rng.uniform(8, 50), (size, size, 1))
    if rng.random() < 0.5:
        f = f + rng.normal(0, rng.uniform(2, 15), (size, size, 3))
    return Image.fromarray(f.clip(0, 255).astype(np.uint8))


def jpeg_round_trip(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """``img`` saved as JPEG at quality 30-95 and decoded again."""
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(rng.integers(30, 96)))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def background(rng: np.random.Generator, size: int, photos: list[np.ndarray], recipe: Recipe = RECIPES["v1"]) -> Image.Image:
    """A ``size`` x ``size`` photo-like background (module docstring) drawn as ``recipe`` says, RGB."""
    kind = rng.random()
    if kind < recipe.photo_share and photos:
        a = photos[int(rng.integers(len(photos)))]
        return augmented_photo(rng, a, size) if recipe.augment else _photo_crop(rng, a, size)
    if recipe.photo_share <= kind < recipe.photo_share + recipe.texture_share:
        return texture(rng, size)
    # negative when a photo was drawn but none were given: a smooth field, as the first recipe had
    rest = (kind - recipe.photo_share - recipe.texture_share) / (1 - recipe.photo_share - recipe.texture_share)
    if rest < 4 / 11:
        return _smooth_field(rng, size)
    if rest < 8 / 11:
        return _shapes_field(rng, size)
    from geomerase.data.scenes import render_scene, sample_scene

    return render_scene(sample_scene(rng), size)


def is_marked(i: int, clean_share: float) -> bool:
    """Whether image ``i`` of a training set carries a mark: spread evenly, a ``1 - clean_share``
    share of them, image 0 included."""
    m = 1 - clean_share
    return math.ceil((i + 1) * m - 1e-9) > math.ceil(i * m - 1e-9)


def render_sample(rng: np.random.Generator, size: int, photos: list[np.ndarray], marked: bool,
                  recipe: Recipe = RECIPES["v1"]) -> tuple[Image.Image, list[Box]]:
    """One training image of ``recipe``: a background, a mark when ``marked``, maybe a JPEG round
    trip; returns it and its boxes (none when clean)."""
    img, boxes = background(rng, size, photos, recipe), []
    if marked:
        img, boxes = add_wide_watermark(img, rng, recipe.min_opacity)
    if recipe.jpeg_share and rng.random() < recipe.jpeg_share:
        img = jpeg_round_trip(img, rng)
    return img, boxes
