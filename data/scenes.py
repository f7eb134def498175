"""Procedural base scenes for the Implicit Concept Dataset (ICD).

Every ICD image starts as a simple compositional scene: a coloured background
with one large main object and sometimes a small second object.  The scenes are
deliberately coarse so that a tiny diffusion model (and a tiny prompt-fidelity
classifier) can learn them at 32x32, while the implicit concepts from
:mod:`geomerase.data.concepts` are overlaid on top of them.

A :class:`Scene` is a pure description; :func:`render_scene` turns it into
pixels deterministically, and :func:`caption` describes it in words that never
mention the implicit concepts (that is the whole point of the ICD: the concept
is in the pixels, not in the caption).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "SHAPES",
    "POSITIONS",
    "SceneObject",
    "Scene",
    "sample_scene",
    "render_scene",
    "caption",
    "scene_attributes",
    "position_word",
    "sample_rich_scene",
    "detailed_caption",
]

# Chosen far apart in RGB (and in hue) so a 32x32, slightly blurred version
# still identifies the colour; no grey, no pink/red or cyan/blue near-pairs.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "blue": (35, 75, 205),
    "red": (205, 35, 35),
    "green": (35, 160, 60),
    "yellow": (235, 205, 35),
    "purple": (130, 45, 175),
    "orange": (245, 130, 25),
    "black": (20, 20, 20),
    "white": (240, 240, 240),
}

# Object colours share the palette so captions use one colour vocabulary.
COLOURS: dict[str, tuple[int, int, int]] = dict(BACKGROUNDS)

# Shapes whose silhouettes differ at ~12 px (a 35% object in a 32 px image):
# a ring keeps its hole, a cross its arms, a triangle its flat base.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "ring", "cross")

# Row-major 3x3 grid of position words, indexed [row][col].
POSITIONS: tuple[tuple[str, ...], ...] = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)

# Pairs too close to read apart after blur (orange/red, orange/yellow) are
# avoided for object-on-background so the object is always visible.
_MIN_CONTRAST = 110.0


@dataclass
class SceneObject:
    """One object: ``centre`` and ``size`` are fractions of the image side."""

    shape: str
    colour: str
    centre: tuple[float, float]
    size: float
    rotation: float = 0.0


@dataclass
class Scene:
    """A background plus objects; ``objects[0]`` is the main object."""

    background: str
    objects: list[SceneObject] = field(default_factory=list)
    # Background texture parameters live in the scene so rendering is a pure
    # function of the scene (same scene -> same pixels at a given size).
    gradient_angle: float = 0.0
    gradient_amplitude: float = 0.0
    noise_seed: int = 0
    noise_amplitude: float = 0.0


def _contrast(a: str, b: str) -> float:
    ca, cb = np.array(COLOURS[a], float), np.array(BACKGROUNDS[b], float)
    return float(np.linalg.norm(ca - cb))


def _pick_colour(rng: np.random.Generator, background: str, exclude: set[str]) -> str:
    options = [
        c for c in COLOURS
        if c != background and c not in exclude and _contrast(c, background) >= _MIN_CONTRAST
    ]
    return str(options[rng.integers(len(options))])


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw a random scene: one large main object and, 40% of the time, a small one."""
    background = str(list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))])
    size = float(rng.uniform(0.35, 0.60))
    # Keep the whole main object inside the frame; the centre wanders within
    # whatever room the size leaves, so position words stay meaningful.
    half = size / 2 + 0.03
    lo, hi = max(half, 0.25), min(1 - half, 0.75)
    centre = (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))
    main = SceneObject(
        shape=str(SHAPES[rng.integers(len(SHAPES))]),
        colour=_pick_colour(rng, background, set()),
        centre=centre,
        size=size,
        rotation=float(rng.uniform(-20, 20)),
    )
    scene = Scene(
        background=background,
        objects=[main],
        gradient_angle=float(rng.uniform(0, 2 * math.pi)),
        gradient_amplitude=float(rng.uniform(0, 22)),
        noise_seed=int(rng.integers(2**31 - 1)),
        noise_amplitude=float(rng.uniform(0, 10)),
    )
    if rng.random() < 0.4:
        small_size = float(rng.uniform(0.10, 0.20))
        # Rejection-sample a spot that does not overlap the main object; give
        # up quietly after a few tries (a one-object scene is still valid).
        for _ in range(20):
            c = (float(rng.uniform(0.1, 0.9)), float(rng.uniform(0.1, 0.9)))
            gap = math.hypot(c[0] - centre[0], c[1] - centre[1])
            inside = all(small_size / 2 <= v <= 1 - small_size / 2 for v in c)
            if inside and gap > (size + small_size) / 2 + 0.02:
                scene.objects.append(SceneObject(
                    shape=str(SHAPES[rng.integers(len(SHAPES))]),
                    colour=_pick_colour(rng, background, {main.colour}),
                    centre=c,
                    size=small_size,
                    rotation=float(rng.uniform(-20, 20)),
                ))
                break
    return scene


# Object size classes of rich scenes: (word, min, max) as a fraction of the image side.
_RICH_SIZES: tuple[tuple[str, float, float], ...] = (("small", 0.12, 0.2), ("medium", 0.24, 0.34),
                                                     ("large", 0.38, 0.55))


def sample_rich_scene(rng: np.random.Generator, max_objects: int = 4) -> Scene:
    """A scene of 1..``max_objects`` non-overlapping objects of any size class, anywhere.

    The pretraining corpus of the base models (``geomerase.data.corpus``) uses these so that
    the caption has a reason to say *where* each object is: with several objects of several
    sizes and colours, the image cannot be drawn from "which shapes and colours" alone.
    """
    background = str(list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))])
    scene = Scene(background=background, gradient_angle=float(rng.uniform(0, 2 * math.pi)),
                  gradient_amplitude=float(rng.uniform(0, 22)), noise_seed=int(rng.integers(2**31 - 1)),
                  noise_amplitude=float(rng.uniform(0, 10)))
    want = int(rng.integers(1, max_objects + 1))
    used: set[str] = set()
    for _ in range(want):
        _, lo, hi = _RICH_SIZES[int(rng.integers(len(_RICH_SIZES)))]
        size = float(rng.uniform(lo, hi))
        for _ in range(20):
            c = (float(rng.uniform(size / 2 + 0.02, 1 - size / 2 - 0.02)),
                 float(rng.uniform(size / 2 + 0.02, 1 - size / 2 - 0.02)))
            if all(math.hypot(c[0] - o.centre[0], c[1] - o.centre[1]) > (size + o.size) / 2 + 0.02
                   for o in scene.objects):
                # Distinct colours while the palette allows, so "the red one" names one object.
                free = [c for c in COLOURS if c not in used and c != background
                        and _contrast(c, background) >= _MIN_CONTRAST]
                colour = _pick_colour(rng, background, used if free else set())
                used.add(colour)
                scene.objects.append(SceneObject(shape=str(SHAPES[rng.integers(len(SHAPES))]), colour=colour,
                                                 centre=c, size=size, rotation=float(rng.uniform(-20, 20))))
                break
    if not scene.objects:  # 20 failed tries for the first object cannot happen, but stay total
        scene.objects.append(SceneObject("circle", _pick_colour(rng, background, set()), (0.5, 0.5), 0.3))
    return scene


def _rotate(points: list[tuple[float, float]], cx: float, cy: float, deg: float) -> list[tuple[float, float]]:
    t = math.radians(deg)
    ct, st = math.cos(t), math.sin(t)
    return [(cx + (x - cx) * ct - (y - cy) * st, cy + (x - cx) * st + (y - cy) * ct) for x, y in points]


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, side: int) -> None:
    """Draw ``obj``'s coverage (255 inside, 0 in holes) on an "L" mask of ``side`` px."""
    fill, hole = 255, 0
    cx, cy = obj.centre[0] * side, obj.centre[1] * side
    r = obj.size * side / 2
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif obj.shape == "ring":
        # Drawn as two discs so the hole shows the background; a thick
        # ring (inner radius 55%) keeps the hole visible at 32 px.
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        ri = r * 0.55
        draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=hole)
    elif obj.shape == "square":
        s = r * 0.9  # visually balance area against the circle
        pts = [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
        draw.polygon(_rotate(pts, cx, cy, obj.rotation), fill=fill)
    elif obj.shape == "triangle":
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a) + r * 0.15)
               for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        draw.polygon(_rotate(pts, cx, cy, obj.rotation), fill=fill)
    elif obj.shape == "cross":
        w = r * 0.36
        pts = [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w),
               (cx + r, cy + w), (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r),
               (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w)]
        draw.polygon(_rotate(pts, cx, cy, obj.rotation), fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def _background(scene: Scene, side: int) -> np.ndarray:
    base = np.array(BACKGROUNDS[scene.background], np.float32)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / max(side - 1, 1) - 0.5
    ramp = xx * math.cos(scene.gradient_angle) + yy * math.sin(scene.gradient_angle)
    img = base[None, None, :] + (ramp * 2 * scene.gradient_amplitude)[..., None]
    if scene.noise_amplitude > 0:
        # Low-frequency blotches: an 8x8 noise field upsampled bilinearly, so
        # the texture survives at any render size without becoming grain.
        nrng = np.random.default_rng(scene.noise_seed)
        coarse = nrng.uniform(-1, 1, size=(8, 8)).astype(np.float32)
        blot = Image.fromarray(coarse).resize((side, side), Image.BILINEAR)
        img += (np.asarray(blot) * scene.noise_amplitude)[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


def render_scene(scene: Scene, size: int) -> Image.Image:
    """Render ``scene`` as an RGB image of ``size`` x ``size`` pixels.

    Each object's coverage mask is drawn at 4x and box-reduced, which gives
    anti-aliased edges cheaply; colours are composited at the final size so
    the (textured) background never needs upsampling.
    """
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    ss = 4
    big = size * ss
    img = Image.fromarray(_background(scene, size))
    for obj in scene.objects:
        mask = Image.new("L", (big, big), 0)
        # A ring's hole is a hole in the mask, so the textured background
        # shows through it rather than a flat patch of colour.
        _draw_object(ImageDraw.Draw(mask), obj, big)
        solid = Image.new("RGB", (size, size), COLOURS[obj.colour])
        img.paste(solid, (0, 0), mask.reduce(ss))
    return img


def position_word(centre: tuple[float, float]) -> str:
    """Map a centre in [0,1]^2 to one of the nine position words."""
    col = 0 if centre[0] < 0.4 else (2 if centre[0] > 0.6 else 1)
    row = 0 if centre[1] < 0.4 else (2 if centre[1] > 0.6 else 1)
    return POSITIONS[row][col]


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _size_word(obj: SceneObject, rng: np.random.Generator) -> str:
    if obj.size >= 0.5:
        return str(rng.choice(["large ", "big ", "huge "]))
    if obj.size >= 0.42:
        return str(rng.choice(["", "large ", "big "]))
    return str(rng.choice(["", "", "medium "]))


# Templates for the main object on its background.  Placeholders: {obj} is
# "red circle", {a_obj} "a red circle", {a_sz_obj} the same with an optional
# size word, {bg} the background colour, {pos_in} "in the top left" etc.
_MAIN_TEMPLATES: tuple[str, ...] = (
    "{a_sz_obj} on {a_bg} background",
    "{a_bg} field with {a_sz_obj}",
    "{obj}, {bg} backdrop",
    "{a_sz_obj} {pos_in} of {a_bg} image",
    "an illustration of {a_obj} against {bg}",
    "{bg} background, {obj}",
    "a simple picture of {a_obj} on {bg}",
    "{a_sz_obj} {pos_in} of {a_bg} background",
    "flat {bg} background with {a_obj} {pos_in}",
)

_SECOND_TEMPLATES: tuple[str, ...] = (
    ", and a small {obj} {pos_in}",
    ", small {obj} {pos_in}",
    " with a small {obj} {pos_in}",
    ", plus a tiny {obj} {pos_in}",
)


def _pos_in(pos: str) -> str:
    """English preposition for a position word ("at the top", "on the left")."""
    if pos in ("top", "bottom"):
        return f"at the {pos}"
    if pos in ("left", "right"):
        return f"on the {pos}"
    return f"in the {pos}"


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """Describe ``scene`` with a randomly chosen template.

    The vocabulary is closed (colours, shapes, position and size words), so
    captions never mention QR codes, watermarks, text or logos.
    """
    main = scene.objects[0]
    obj = f"{main.colour} {main.shape}"
    sz = _size_word(main, rng)
    pos = position_word(main.centre)
    fields = {
        "obj": obj,
        "a_obj": _a(obj),
        "a_sz_obj": _a(sz + obj),
        "bg": scene.background,
        "a_bg": _a(scene.background),
        "pos": pos,
        "pos_in": _pos_in(pos),
    }
    text = str(rng.choice(_MAIN_TEMPLATES)).format(**fields)
    for extra in scene.objects[1:]:
        epos = position_word(extra.centre)
        text += str(rng.choice(_SECOND_TEMPLATES)).format(
            obj=f"{extra.colour} {extra.shape}", pos_in=_pos_in(epos))
    return text


def _rich_size_word(obj: SceneObject) -> str:
    for word, _, hi in _RICH_SIZES:
        if obj.size <= hi:
            return word
    return _RICH_SIZES[-1][0]


def detailed_caption(scene: Scene, rng: np.random.Generator) -> str:
    """Every object with its size, colour, shape and position word, in random order, plus the
    background: ``"a green background with a large red circle in the top left and a small
    white ring at the bottom"``. Words only from the closed vocabulary of :func:`caption`."""
    parts = [f"{_a(f'{_rich_size_word(o)} {o.colour} {o.shape}')} {_pos_in(position_word(o.centre))}"
             for o in scene.objects]
    order = rng.permutation(len(parts))
    things = [parts[i] for i in order]
    body = things[0] if len(things) == 1 else ", ".join(things[:-1]) + " and " + things[-1]
    if rng.random() < 0.5:
        return f"{_a(scene.background)} background with {body}"
    return f"{body} on {_a(scene.background)} background"


def scene_attributes(scene: Scene) -> dict[str, str]:
    """Labels for the prompt-fidelity classifier: background, main shape and colour."""
    main = scene.objects[0]
    return {"background": scene.background, "shape": main.shape, "colour": main.colour}
