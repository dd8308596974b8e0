"""A learnable, offline text-to-image *simulator* with the Stable Diffusion backend's interface.

**This is a simulator for development, CI and demos. It is not a substitute for Stable Diffusion**
and numbers obtained with it say nothing about StableRep on real synthetic images. It exists because
a randomly initialised (or toy) diffusion pipeline produces caption-independent images, so on a CPU
and offline there would otherwise be no way to show that the pipeline *learns* something.

World model
-----------
A caption describes composable visual attributes (:data:`ATTRIBUTES`): ``shape`` (10), ``color``
(8), ``texture`` (5), ``background`` (6) and ``count`` (one/two/three), e.g. "two red striped stars
on a blue background". :func:`make_captions` writes such captions from a few templates;
:func:`parse_caption` reads the attributes back out of *any* text, filling whatever it cannot find
deterministically from a hash of the text, so every caption source works (but only simulator
captions are meaningful). The renderer (numpy + PIL, about 0.5 ms for a 64x64 image) draws the
objects with nuisance variation: position, layout, scale, rotation, colour shade, lighting
(brightness, gradient, colour temperature, contrast), pixel noise and small occluders.

Nuisance parameters live in a vector ``theta`` in ``[-1, 1]^D`` (the *prior* is uniform); every
rendered quantity is a fixed map of ``theta``.

Guidance scale (the paper's diversity / fidelity trade-off)
-----------------------------------------------------------
For guidance scale ``w >= 0`` (``config.guidance_scale``):

* **semantic mismatch** -- each of the 5 attributes of each image is independently replaced by a
  different, uniformly chosen value with probability::

      p_mismatch(w) = P0 / (1 + w)                     P0 = 0.5  (MISMATCH_P0)

  so an image follows its caption on all attributes with probability ``(1 - p_mismatch)^5``
  (w = 0.5: 0.13, 2: 0.40, 8: 0.75, 16: 0.86);
* **diversity** -- each caption ``c`` has a *mode* ``theta_c`` drawn from the prior (from seed
  ``(s, c)``), each image ``j`` a fresh draw ``eps_j`` (from seed ``(s, c, j)``), and the image uses::

      theta_j = theta_c + d(w) * (eps_j - theta_c)      d(w) = 1 / (1 + w / W0),  W0 = 3 (DIVERSITY_W0)

  Occluders appear with probability ``0.5 * d(w)`` each (two slots) and the pixel noise has standard
  deviation ``(2 + 6 d(w)) / 255``.

At ``w = 0`` the images of a caption are independent draws from the prior (maximal diversity, many
mismatches); as ``w`` grows they collapse onto the caption's mode (faithful, little variety). The
*marginal* image distribution is the prior at every ``w`` (modes are prior draws), so a sweep over
``w`` changes only how the positives of a caption relate to each other: too low a ``w`` makes many
positives semantically different (the loss pulls different shapes/colours together), too high a
``w`` makes positives near-duplicates so the multi-positive loss degenerates towards instance
discrimination and teaches no invariance to pose, layout or lighting. Both formulas are smooth and
monotone in ``w``. The random numbers of an image are drawn in a fixed order whatever ``w`` is
(common random numbers), so raising ``w`` only ever removes mismatches and pulls nuisance towards
the mode, image by image.

Determinism
-----------
Image ``j`` of caption id ``c`` with base seed ``s`` uses ``numpy.random.SeedSequence([s, c, j])``
(and the caption mode ``SeedSequence([s, c], spawn_key=(1,))``): it does not depend on the batch it
is generated in, on ``n`` or on the other captions. The evaluation set (:func:`render_eval_set`)
uses a separate seed space (``spawn_key=(2,)``) and independent nuisance, like "real" photos.

Public API
----------
:data:`ATTRIBUTES`, :func:`make_captions`, :func:`parse_caption`, :func:`caption_words`,
:func:`mismatch_probability`, :func:`diversity_scale`, :func:`render_attributes`,
:func:`generate_caption_images`, :class:`SimulatorGenerator` (Ray Data ``map_batches`` callable),
:func:`render_eval_set`, :func:`write_image_folder`.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ...config import GeneratorConfig

__all__ = [
    "ATTRIBUTES",
    "SHAPES",
    "COLORS",
    "TEXTURES",
    "BACKGROUNDS",
    "COUNTS",
    "MISMATCH_P0",
    "DIVERSITY_W0",
    "make_captions",
    "parse_caption",
    "caption_words",
    "mismatch_probability",
    "diversity_scale",
    "render_attributes",
    "generate_caption_images",
    "SimulatorGenerator",
    "render_eval_set",
    "write_image_folder",
]

# --------------------------------------------------------------------------------------------------
# Vocabulary
SHAPES = (
    "circle", "square", "triangle", "star", "cross", "ring", "heart", "diamond", "hexagon", "crescent",
)  # fmt: skip
COLORS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
TEXTURES = ("solid", "striped", "dotted", "checkered", "wavy")
BACKGROUNDS = ("white", "black", "gray", "blue", "green", "sand")
COUNTS = ("one", "two", "three")

#: attribute name -> its values (the order defines the attribute's integer codes)
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": COLORS,
    "texture": TEXTURES,
    "background": BACKGROUNDS,
    "count": COUNTS,
}
_ATTR_NAMES = tuple(ATTRIBUTES)
_ATTR_SIZES = np.array([len(v) for v in ATTRIBUTES.values()], dtype=np.int64)
_ALIASES = {"colour": "color"}

_COLOR_RGB = np.array(
    [
        (0.86, 0.10, 0.10),  # red
        (1.00, 0.55, 0.05),  # orange
        (0.95, 0.85, 0.10),  # yellow
        (0.10, 0.68, 0.20),  # green
        (0.10, 0.80, 0.85),  # cyan
        (0.15, 0.28, 0.90),  # blue
        (0.55, 0.18, 0.80),  # purple
        (1.00, 0.45, 0.72),  # pink
    ],
    dtype=np.float32,
)
# Backgrounds are muted (light or dark) so that saturated objects stand out even on a namesake.
_BACKGROUND_RGB = np.array(
    [
        (0.94, 0.94, 0.92),  # white
        (0.08, 0.08, 0.09),  # black
        (0.50, 0.50, 0.50),  # gray
        (0.55, 0.70, 0.90),  # blue (sky)
        (0.33, 0.50, 0.30),  # green (grass)
        (0.86, 0.77, 0.58),  # sand
    ],
    dtype=np.float32,
)

# --------------------------------------------------------------------------------------------------
# Guidance scale -> mismatch probability and diversity
MISMATCH_P0 = 0.5
DIVERSITY_W0 = 3.0
_OCCLUDER_P = 0.5  # per occluder slot at d = 1
_EVAL_OCCLUDER_P = 0.3


def mismatch_probability(guidance_scale: float, p0: float = MISMATCH_P0) -> float:
    """Per-attribute probability that an image does not follow its caption: ``p0 / (1 + w)``."""
    return float(p0) / (1.0 + max(float(guidance_scale), 0.0))


def diversity_scale(guidance_scale: float, w0: float = DIVERSITY_W0) -> float:
    """Within-caption nuisance spread ``d(w) = 1 / (1 + w / w0)`` (1 at w = 0, -> 0 as w grows)."""
    return 1.0 / (1.0 + max(float(guidance_scale), 0.0) / float(w0))


# --------------------------------------------------------------------------------------------------
# Captions
_PLURAL = {s: (s + "es" if s.endswith(("s", "x")) else s + "s") for s in SHAPES}
_TEXTURE_PATTERN = {
    "solid": "plain", "striped": "striped", "dotted": "polka-dot", "checkered": "checkered",
    "wavy": "wavy",
}  # fmt: skip
_TEMPLATES = (
    "{count} {color} {texture} {shapes} on a {background} background",
    "a photo of {count} {texture} {color} {shapes} against a {background} background",
    "{count} {color} {shapes} with a {pattern} pattern, {background} background",
    "a {background} background with {count} {texture} {color} {shapes}",
    "an illustration of {count} {color} {texture} {shapes} on a {background} background",
)
_ONE_WORDS = ("a", "one", "a single")


def _seq(entropy: list[int], key: int | None = None) -> np.random.SeedSequence:
    entropy = [int(e) & 0xFFFF_FFFF_FFFF_FFFF for e in entropy]  # SeedSequence needs non-negative
    if key is None:
        return np.random.SeedSequence(entropy)
    return np.random.SeedSequence(entropy, spawn_key=(key,))


_KEY_MODE, _KEY_EVAL, _KEY_CAPTIONS = 1, 2, 3


def _caption_text(values: Mapping[str, str], template: int, one_word: str = "a") -> str:
    n = values["count"]
    shape = values["shape"]
    text = _TEMPLATES[template].format(
        count=one_word if n == "one" else n,
        color=values["color"],
        texture=values["texture"],
        pattern=_TEXTURE_PATTERN[values["texture"]],
        shapes=shape if n == "one" else _PLURAL[shape],
        background=values["background"],
    )
    return re.sub(r"\ba ([aeiou])", r"an \1", text)


def make_captions(num: int, seed: int = 0) -> list[str]:
    """``num`` templated captions with uniformly random attributes, deterministic in ``seed``.

    E.g. "two red striped stars on a blue background", "a photo of a dotted orange heart against a
    sand background". :func:`parse_caption` recovers every attribute exactly.
    """
    rng = np.random.default_rng(_seq([seed], _KEY_CAPTIONS))
    codes = rng.integers(0, _ATTR_SIZES, size=(num, len(_ATTR_SIZES)))
    templates = rng.integers(0, len(_TEMPLATES), size=num)
    ones = rng.integers(0, len(_ONE_WORDS), size=num)
    out = []
    for row, t, o in zip(codes, templates, ones):
        values = {a: ATTRIBUTES[a][k] for a, k in zip(_ATTR_NAMES, row)}
        out.append(_caption_text(values, int(t), _ONE_WORDS[o]))
    return out


def _word_map() -> dict[str, dict[str, str]]:
    shape = {s: s for s in SHAPES} | {p: s for s, p in _PLURAL.items()}
    shape |= {
        "disc": "circle", "discs": "circle", "disk": "circle", "disks": "circle",
        "donut": "ring", "donuts": "ring", "rhombus": "diamond", "rhombi": "diamond",
        "moon": "crescent", "moons": "crescent", "hexagons": "hexagon",
    }  # fmt: skip
    color = {c: c for c in COLORS} | {
        "crimson": "red", "scarlet": "red", "gold": "yellow", "golden": "yellow", "lime": "green",
        "teal": "cyan", "turquoise": "cyan", "navy": "blue", "violet": "purple", "magenta": "pink",
    }  # fmt: skip
    texture = {t: t for t in TEXTURES} | {
        "plain": "solid", "stripy": "striped", "stripes": "striped", "stripe": "striped",
        "spotted": "dotted", "polka": "dotted", "dots": "dotted", "dot": "dotted",
        "chequered": "checkered", "checked": "checkered", "checkerboard": "checkered",
        "checks": "checkered", "waves": "wavy", "wave": "wavy",
    }  # fmt: skip
    background = {b: b for b in BACKGROUNDS} | {"grey": "gray", "sandy": "sand", "beige": "sand"}
    count = {
        "one": "one", "single": "one", "1": "one", "two": "two", "pair": "two", "couple": "two",
        "2": "two", "three": "three", "3": "three", "triple": "three",
    }  # fmt: skip
    return {"shape": shape, "color": color, "texture": texture, "background": background, "count": count}


_WORDS = _word_map()
_PLURAL_SHAPE_WORDS = set(_PLURAL.values()) | {
    "discs", "disks", "donuts", "rhombi", "moons",
}  # fmt: skip
_BACKGROUND_NOUNS = {"background", "backgrounds", "backdrop"}


def caption_words() -> list[str]:
    """Every word the caption templates and the parser know (for a word-level tokenizer)."""
    words = set().union(*(set(m) for m in _WORDS.values())) | _BACKGROUND_NOUNS
    for t in _TEMPLATES:
        words |= set(re.findall(r"[a-z]+", re.sub(r"\{[a-z]+\}", " ", t)))
    words |= {"a", "an"} | {w for one in _ONE_WORDS for w in one.split()}
    return sorted(words)


def _normalise(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", str(text).lower()))


@functools.lru_cache(maxsize=65536)
def _parse_codes(text: str) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    norm = _normalise(text)
    tokens = norm.split()
    found: dict[str, str] = {}
    used: set[int] = set()
    # background: a background word just before (or after) "background"/"backdrop", else "on X"
    for i, tok in enumerate(tokens):
        if tok not in _BACKGROUND_NOUNS:
            continue
        window = list(range(i - 1, max(i - 4, -1), -1)) + list(range(i + 1, min(i + 3, len(tokens))))
        for k in window:
            if tokens[k] in _WORDS["background"]:
                found["background"] = _WORDS["background"][tokens[k]]
                used.add(k)
                break
        if "background" in found:
            break
    if "background" not in found:
        for i, tok in enumerate(tokens[:-1]):
            if tok in ("on", "against") and tokens[i + 1] in _WORDS["background"]:
                found["background"] = _WORDS["background"][tokens[i + 1]]
                used.add(i + 1)
                break
    plural = None
    for i, tok in enumerate(tokens):
        if i in used:
            continue
        for attr in ("shape", "color", "texture", "count"):
            if attr not in found and tok in _WORDS[attr]:
                found[attr] = _WORDS[attr][tok]
                used.add(i)
                if attr == "shape":
                    plural = tok in _PLURAL_SHAPE_WORDS
                break
    digest = hashlib.blake2b(norm.encode(), digest_size=16).digest()
    codes, present = [], []
    for a, attr in enumerate(_ATTR_NAMES):
        if attr in found:
            codes.append(ATTRIBUTES[attr].index(found[attr]))
            present.append(True)
            continue
        h = int.from_bytes(digest[3 * a : 3 * a + 3], "little")
        if attr == "count" and plural is not None:
            codes.append(1 + h % 2 if plural else 0)  # "stars" -> two or three; "a star" -> one
            present.append(not plural)
        else:
            codes.append(h % len(ATTRIBUTES[attr]))
            present.append(False)
    return tuple(codes), tuple(present)


def parse_caption(text: str) -> dict[str, str]:
    """The attributes a caption describes: ``{"shape", "color", "texture", "background", "count"}``.

    Recognises the simulator's vocabulary and a few synonyms ("grey", "spotted", "pair", "moon",
    ...). An attribute missing from the text is filled deterministically from a BLAKE2 hash of the
    normalised text (stable across processes and runs), so arbitrary captions map to images too. A
    count that is not spelled out is "one" for a singular shape noun and two/three for a plural.
    """
    codes, _ = _parse_codes(str(text))
    return {a: ATTRIBUTES[a][k] for a, k in zip(_ATTR_NAMES, codes)}


# --------------------------------------------------------------------------------------------------
# Shapes: polygons in a unit frame (y down), each (vertices (V, 2), fill 255 or 0 to cut a hole)
def _regular(k: int, radius: float, phase: float = -math.pi / 2) -> np.ndarray:
    a = phase + 2 * math.pi * np.arange(k) / k
    return np.stack([radius * np.cos(a), radius * np.sin(a)], 1)


def _make_shapes() -> dict[str, list[tuple[np.ndarray, int]]]:
    star_r = np.where(np.arange(10) % 2 == 0, 1.1, 0.45)
    star_a = -math.pi / 2 + math.pi * np.arange(10) / 5
    a = 0.32
    cross = np.array(
        [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a),
         (-1, -a), (-a, -a)], dtype=np.float64,
    )  # fmt: skip
    t = np.linspace(0, 2 * math.pi, 72, endpoint=False)
    heart = np.stack(
        [16 * np.sin(t) ** 3, -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))], 1
    )
    heart = (heart - (heart.max(0) + heart.min(0)) / 2) / 16.5
    shapes = {
        "circle": [(_regular(48, 0.92), 255)],
        "square": [(_regular(4, 0.82 * math.sqrt(2), math.pi / 4), 255)],
        "triangle": [(_regular(3, 1.12) + (0, 0.2), 255)],
        "star": [(np.stack([star_r * np.cos(star_a), star_r * np.sin(star_a)], 1), 255)],
        "cross": [(cross, 255)],
        "ring": [(_regular(48, 1.0), 255), (_regular(40, 0.55), 0)],
        "heart": [(heart, 255)],
        "diamond": [(np.array([(0, -1.08), (0.62, 0), (0, 1.08), (-0.62, 0)], dtype=np.float64), 255)],
        "hexagon": [(_regular(6, 0.96, 0.0), 255)],
        "crescent": [(_regular(48, 1.0), 255), (_regular(48, 0.84) + (0.45, -0.12), 0)],
    }
    assert tuple(shapes) == SHAPES
    return shapes


_SHAPE_POLYS = [_make_shapes()[s] for s in SHAPES]
# max |vertex| over all shapes, in units of the object radius (1.23: the triangle's base corners)
_SHAPE_EXTENT = float(max(np.hypot(*p.T).max() for polys in _SHAPE_POLYS for p, _ in polys))

# --------------------------------------------------------------------------------------------------
# Nuisance vector theta in [-1, 1]^D: what each coordinate controls
_T_GX, _T_GY, _T_LAYOUT, _T_SPREAD, _T_SCALE = 0, 1, 2, 3, 4
_T_ROT = slice(5, 8)  # per-object rotation
_T_OSCALE = slice(8, 11)  # per-object scale jitter
_T_GAIN, _T_GRAD_DIR, _T_GRAD, _T_TEMP, _T_CONTRAST = 11, 12, 13, 14, 15
_T_FG = slice(16, 19)  # object colour shade
_T_BG = slice(19, 22)  # background colour shade
_T_TEX_PHASE = 22
_NUISANCE_DIM = 23
_BASE_RADIUS = (0.27, 0.18, 0.13)  # object radius / image size for one, two, three objects
_SPREAD = (0.0, 1.3, 1.5)  # distance of the objects from the group centre, in object radii
_NUM_OCC_SLOTS = 2
_OCC_FIELDS = 7  # presence, kind, x, y, w, h, grey level


def _supersample(size: int) -> int:
    return 4 if size <= 96 else 2 if size <= 384 else 1


def _texture(kind: int, u: np.ndarray, v: np.ndarray, r_px: float, phase: float) -> np.ndarray | None:
    """Share of the pale second tone in [0, 1] at object-frame coordinates (u, v) (unit = radius)."""
    if kind == 0:  # solid
        return None
    f = 1.6  # cycles per object radius
    sharp = max(1.0, 0.35 * r_px / f)  # ~ one-pixel soft edges
    if kind == 1:  # striped
        s = np.sin(2 * np.pi * (f * u + phase))
    elif kind == 2:  # dotted
        cu = (f * u + phase) % 1.0 - 0.5
        cv = (f * v) % 1.0 - 0.5
        return np.clip(0.5 + (0.3 - np.sqrt(cu * cu + cv * cv)) * (r_px / f), 0.0, 1.0)
    elif kind == 3:  # checkered
        s = np.sin(np.pi * (1.3 * u + phase)) * np.sin(np.pi * 1.3 * v)
        sharp *= 2.0
    else:  # wavy
        s = np.sin(2 * np.pi * (f * u + 0.22 * np.sin(2 * np.pi * 1.1 * v) + phase))
    return np.clip(0.5 + sharp * s, 0.0, 1.0)


def _render(
    codes: np.ndarray | tuple[int, ...],
    theta: np.ndarray,
    size: int,
    occluders: np.ndarray,
    occluder_p: float,
    noise_rng: np.random.Generator,
    noise_sigma: float,
) -> np.ndarray:
    """One uint8 (size, size, 3) image of attribute ``codes`` with nuisance ``theta``."""
    shape_k, color_k, texture_k, bg_k, count_k = (int(c) for c in codes)
    S = float(size)
    ss = _supersample(size)
    coords = np.arange(size, dtype=np.float32) + 0.5

    bg = np.clip(_BACKGROUND_RGB[bg_k] + 0.05 * theta[_T_BG], 0.0, 1.0)
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = bg

    # layout: objects on a circle of radius `spread` around the group centre
    k = count_k + 1
    r = _BASE_RADIUS[count_k] * S * math.exp(0.22 * theta[_T_SCALE])
    spread = r * _SPREAD[count_k] * (1.0 + 0.12 * theta[_T_SPREAD])  # objects barely touch at worst
    extent = spread + r * _SHAPE_EXTENT * math.exp(0.08)
    half_range = max(0.0, S / 2 - extent)
    gx = S / 2 + theta[_T_GX] * half_range
    gy = S / 2 + theta[_T_GY] * half_range
    phi = math.pi * theta[_T_LAYOUT]

    fg = np.clip(_COLOR_RGB[color_k] + 0.06 * theta[_T_FG], 0.0, 1.0)
    pale = 0.3 * fg + 0.7
    for i in range(k):
        a = phi + 2 * math.pi * i / k
        cx, cy = gx + spread * math.cos(a), gy + spread * math.sin(a)
        ri = r * math.exp(0.08 * theta[_T_OSCALE][i])
        rot = math.pi * theta[_T_ROT][i]
        c, s = math.cos(rot), math.sin(rot)
        reach = ri * _SHAPE_EXTENT + 1.0
        x0, x1 = max(0, int(cx - reach)), min(size, int(math.ceil(cx + reach)))
        y0, y1 = max(0, int(cy - reach)), min(size, int(math.ceil(cy + reach)))
        if x1 <= x0 or y1 <= y0:
            continue
        mask = Image.new("L", ((x1 - x0) * ss, (y1 - y0) * ss), 0)
        draw = ImageDraw.Draw(mask)
        for poly, fill in _SHAPE_POLYS[shape_k]:
            px = (c * poly[:, 0] - s * poly[:, 1]) * ri + cx - x0
            py = (s * poly[:, 0] + c * poly[:, 1]) * ri + cy - y0
            draw.polygon((np.stack([px, py], 1) * ss).ravel().tolist(), fill=fill)
        if ss > 1:
            mask = mask.reduce(ss)
        alpha = np.asarray(mask, dtype=np.float32)[..., None] * (1.0 / 255.0)
        region = img[y0:y1, x0:x1]
        t = None
        if texture_k:
            dx = (coords[x0:x1] - cx)[None, :]
            dy = (coords[y0:y1] - cy)[:, None]
            u = (c * dx + s * dy) / ri
            v = (-s * dx + c * dy) / ri
            t = _texture(texture_k, u, v, ri, 0.5 * theta[_T_TEX_PHASE])
        obj = fg if t is None else fg + (pale - fg) * t[..., None]
        region += alpha * (obj - region)

    # small occluders (neutral-coloured rectangles / discs)
    for o in occluders:
        if o[0] >= occluder_p:
            continue
        w_, h_ = (0.08 + 0.14 * o[4]) * S, (0.08 + 0.14 * o[5]) * S
        ox, oy = o[2] * S, o[3] * S
        x0, x1 = max(0, int(ox - w_ / 2)), min(size, int(math.ceil(ox + w_ / 2)))
        y0, y1 = max(0, int(oy - h_ / 2)), min(size, int(math.ceil(oy + h_ / 2)))
        if x1 <= x0 or y1 <= y0:
            continue
        grey = np.array([0.25 + 0.5 * o[6], 0.22 + 0.45 * o[6], 0.18 + 0.4 * o[6]], dtype=np.float32)
        if o[1] < 0.5:
            img[y0:y1, x0:x1] = grey
        else:
            ex = ((coords[x0:x1] - ox) / (w_ / 2))[None, :] ** 2
            ey = ((coords[y0:y1] - oy) / (h_ / 2))[:, None] ** 2
            m = (ex + ey <= 1.0)[..., None]
            img[y0:y1, x0:x1] = np.where(m, grey, img[y0:y1, x0:x1])

    # lighting: gain, linear gradient, colour temperature, contrast
    gain = 1.0 + 0.22 * theta[_T_GAIN]
    gdir = math.pi * theta[_T_GRAD_DIR]
    g = 0.25 * theta[_T_GRAD]
    ramp = (coords - S / 2) / (S / 2)
    light = gain * (1.0 + g * (math.cos(gdir) * ramp[None, :] + math.sin(gdir) * ramp[:, None]))
    temp = 0.06 * theta[_T_TEMP]
    img *= light[..., None] * np.array([1 + temp, 1.0, 1 - temp], dtype=np.float32)
    contrast = 1.0 + 0.15 * theta[_T_CONTRAST]
    if contrast != 1.0:
        img -= 0.5
        img *= contrast
        img += 0.5
    if noise_sigma > 0:
        img += noise_rng.standard_normal(img.shape, dtype=np.float32) * noise_sigma
    img *= 255.0
    img += 0.5
    np.clip(img, 0.0, 255.0, out=img)
    return img.astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Generation
def _to_codes(attributes: Mapping[str, Any]) -> np.ndarray:
    codes = np.empty(len(_ATTR_NAMES), dtype=np.int64)
    for a, attr in enumerate(_ATTR_NAMES):
        value = attributes[attr]
        codes[a] = ATTRIBUTES[attr].index(value) if isinstance(value, str) else int(value)
    return codes


def _caption_mode(seed: int, caption_id: int) -> np.ndarray:
    return np.random.default_rng(_seq([seed, caption_id], _KEY_MODE)).uniform(-1, 1, _NUISANCE_DIM)


def _generate_one(
    codes: np.ndarray,
    mode: np.ndarray,
    seed: int,
    caption_id: int,
    j: int,
    p_mis: float,
    d: float,
    size: int,
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(_seq([seed, caption_id, j]))
    # fixed draw order and count, whatever w is (common random numbers across guidance scales)
    u_mis = rng.random(len(_ATTR_SIZES))
    offset = rng.integers(1, _ATTR_SIZES)
    eps = rng.uniform(-1, 1, _NUISANCE_DIM)
    occ = rng.random((_NUM_OCC_SLOTS, _OCC_FIELDS))
    used = np.where(u_mis < p_mis, (codes + offset) % _ATTR_SIZES, codes)
    theta = mode + d * (eps - mode)
    sigma = (2.0 + 6.0 * d) / 255.0
    return _render(used, theta, size, occ, _OCCLUDER_P * d, rng, sigma), used


def generate_caption_images(
    caption: str,
    caption_id: int,
    num_images: int,
    guidance_scale: float = 2.0,
    size: int = 64,
    seed: int = 0,
    return_attributes: bool = False,
    *,
    mismatch_p0: float = MISMATCH_P0,
    diversity_w0: float = DIVERSITY_W0,
):
    """Images ``0..num_images-1`` of one caption: uint8 ``(num_images, size, size, 3)``.

    With ``return_attributes`` also returns the attributes each image was *actually* rendered with
    (a list of dicts; they differ from ``parse_caption(caption)`` where a semantic mismatch hit).
    """
    codes = np.asarray(_parse_codes(str(caption))[0], dtype=np.int64)
    mode = _caption_mode(seed, caption_id)
    p_mis = mismatch_probability(guidance_scale, mismatch_p0)
    d = diversity_scale(guidance_scale, diversity_w0)
    images = np.empty((num_images, size, size, 3), dtype=np.uint8)
    used_all = []
    for j in range(num_images):
        images[j], used = _generate_one(codes, mode, seed, caption_id, j, p_mis, d, size)
        used_all.append(used)
    if not return_attributes:
        return images
    return images, [{a: ATTRIBUTES[a][k] for a, k in zip(_ATTR_NAMES, u)} for u in used_all]


def render_attributes(
    attributes: Mapping[str, Any],
    size: int = 64,
    seed: int | np.random.SeedSequence | np.random.Generator = 0,
    occluder_p: float = _EVAL_OCCLUDER_P,
    noise_sigma: float = 5.0 / 255.0,
) -> np.ndarray:
    """One image of exactly ``attributes`` (names or integer codes) with nuisance drawn from the prior."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    theta = rng.uniform(-1, 1, _NUISANCE_DIM)
    occ = rng.random((_NUM_OCC_SLOTS, _OCC_FIELDS))
    return _render(_to_codes(attributes), theta, size, occ, occluder_p, rng, noise_sigma)


class SimulatorGenerator:
    """Ray Data ``map_batches`` callable (``batch_format="numpy"``) with the diffusers backend's contract.

    Input columns: ``caption_id`` (int64) and ``caption`` (str); every other column is passed through
    unchanged. Added columns: ``images`` uint8 ``(B, n, H, W, 3)`` with ``n = images_per_caption`` and
    ``H = W = output_size``, and ``num_images`` int32 ``(B,)`` (always ``n``: the simulator has no
    safety checker that drops images). Image ``j`` of caption id ``c`` depends only on
    ``(config.seed, c, j)``, the caption text and ``guidance_scale``.
    """

    @staticmethod
    def preflight(config: GeneratorConfig) -> None:
        """Nothing to check: the simulator needs no files."""

    @staticmethod
    def tokenizer_source(config: GeneratorConfig) -> None:
        """None: StableRep+ uses the built-in word tokenizer with simulator captions."""

    def __init__(
        self,
        config: GeneratorConfig,
        *,
        mismatch_p0: float = MISMATCH_P0,
        diversity_w0: float = DIVERSITY_W0,
    ):
        self.config = config
        self.num_images = int(config.images_per_caption)
        self.size = int(config.output_size)
        self.seed = int(config.seed)
        self.guidance_scale = float(config.guidance_scale)
        self.mismatch_p0 = float(mismatch_p0)
        self.diversity_w0 = float(diversity_w0)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for col in ("caption_id", "caption"):
            if col not in batch:
                raise KeyError(f"SimulatorGenerator: input batch lacks the {col!r} column")
        ids = np.asarray(batch["caption_id"]).astype(np.int64, copy=False)
        captions = batch["caption"]
        B = len(ids)
        n, S = self.num_images, self.size
        images = np.empty((B, n, S, S, 3), dtype=np.uint8)
        for b in range(B):
            text = captions[b]
            if isinstance(text, bytes):
                text = text.decode("utf-8", "replace")
            images[b] = generate_caption_images(
                str(text), int(ids[b]), n, self.guidance_scale, S, self.seed,
                mismatch_p0=self.mismatch_p0, diversity_w0=self.diversity_w0,
            )  # fmt: skip
        out = dict(batch)
        out["images"] = images
        out["num_images"] = np.full(B, n, dtype=np.int32)
        return out


# --------------------------------------------------------------------------------------------------
# Held-out labelled evaluation set
_SPLITS = {"train": 0, "test": 1}


def render_eval_set(
    attribute: str = "shape",
    per_class: int = 50,
    size: int = 64,
    seed: int = 0,
    split: str = "train",
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A labelled, class-balanced set for linear probes / kNN: ``(images, labels, class_names)``.

    ``images`` uint8 ``(N, size, size, 3)`` with ``N = per_class * num_classes``, ``labels`` int64
    ``(N,)``, ``class_names`` the values of ``attribute`` sorted alphabetically (so labels agree with
    torchvision's ``ImageFolder`` after :func:`write_image_folder`). Each image fixes ``attribute``
    to its class, draws the other attributes uniformly and the nuisance independently from the prior
    (no caption modes, no mismatches, occluders with probability 0.3 per slot), in a seed space
    disjoint from generation; ``split="train"`` and ``"test"`` use disjoint seeds.
    """
    attribute = _ALIASES.get(attribute, attribute)
    if attribute not in ATTRIBUTES:
        raise ValueError(f"attribute: {attribute!r} is not one of {sorted(ATTRIBUTES)}")
    if split not in _SPLITS:
        raise ValueError(f"split: {split!r} is not 'train' or 'test'")
    a = _ATTR_NAMES.index(attribute)
    class_names = sorted(ATTRIBUTES[attribute])
    num_classes = len(class_names)
    images = np.empty((per_class * num_classes, size, size, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), per_class)
    for idx in range(len(labels)):
        label, i = int(labels[idx]), idx % per_class
        rng = np.random.default_rng(_seq([seed, _SPLITS[split], a, label, i], _KEY_EVAL))
        codes = rng.integers(0, _ATTR_SIZES)
        codes[a] = ATTRIBUTES[attribute].index(class_names[label])
        images[idx] = render_attributes(dict(zip(_ATTR_NAMES, codes.tolist())), size, rng)
    return images, labels, class_names


def write_image_folder(
    root: str | Path, images: np.ndarray, labels: np.ndarray, class_names: list[str]
) -> Path:
    """Write ``root/<class_name>/<index>.png`` (torchvision ImageFolder layout); returns ``root``.

    Every class gets a directory, even an empty one. Pass alphabetically sorted ``class_names`` (as
    :func:`render_eval_set` returns) for ImageFolder's labels to equal ``labels``.
    """
    root = Path(root)
    for name in class_names:
        (root / name).mkdir(parents=True, exist_ok=True)
    for idx, (img, label) in enumerate(zip(images, labels)):
        path = root / class_names[int(label)] / f"{idx:06d}.png"
        Image.fromarray(np.asarray(img, dtype=np.uint8)).save(path)
    return root
