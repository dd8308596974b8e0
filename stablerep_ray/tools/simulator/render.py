"""The renderer: attribute codes and a nuisance vector ``theta`` to one uint8 image (numpy + PIL).

It knows how attributes look (colours, backgrounds, shape polygons, textures) and what each
coordinate of ``theta`` controls (layout, scale, rotation, shade, lighting); it draws no random
numbers of its own beyond the pixel noise generator it is handed, so the generation backend and the
evaluation sets decide the randomness and the renderer stays a pure function of its inputs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .world import _ATTR_NAMES, _EVAL_OCCLUDER_P, ATTRIBUTES, SHAPES, WORLDS, World, get_world

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
    world: World = WORLDS["default"],
) -> np.ndarray:
    """One uint8 (size, size, 3) image of attribute ``codes`` with nuisance ``theta``, objects sized
    and turned by ``world``'s rules (occluders only where it has them)."""
    if not world.occluders:
        occluder_p = 0.0
    shape_k, color_k, texture_k, bg_k, count_k = (int(c) for c in codes)
    S = float(size)
    ss = _supersample(size)
    coords = np.arange(size, dtype=np.float32) + 0.5

    bg = np.clip(_BACKGROUND_RGB[bg_k] + 0.05 * theta[_T_BG], 0.0, 1.0)
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = bg

    # layout: objects on a circle of radius `spread` around the group centre
    k = count_k + 1
    r = _BASE_RADIUS[count_k] * world.scale * S * math.exp(0.22 * theta[_T_SCALE])
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
        rot = math.pi * world.rotation * theta[_T_ROT][i]
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
# Attributes to images
def _to_codes(attributes: Mapping[str, Any]) -> np.ndarray:
    codes = np.empty(len(_ATTR_NAMES), dtype=np.int64)
    for a, attr in enumerate(_ATTR_NAMES):
        value = attributes[attr]
        codes[a] = ATTRIBUTES[attr].index(value) if isinstance(value, str) else int(value)
    return codes


def render_attributes(
    attributes: Mapping[str, Any],
    size: int = 64,
    seed: int | np.random.SeedSequence | np.random.Generator = 0,
    occluder_p: float = _EVAL_OCCLUDER_P,
    noise_sigma: float = 5.0 / 255.0,
    world: str | World = "default",
) -> np.ndarray:
    """One image of exactly ``attributes`` (names or integer codes) with nuisance drawn from the prior
    (objects sized and turned by ``world``'s rules, no occluders where it has none; its fixed
    attributes are the caller's to apply: ``World.apply_fixed``)."""
    world = get_world(world)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    theta = rng.uniform(-1, 1, _NUISANCE_DIM)
    occ = rng.random((_NUM_OCC_SLOTS, _OCC_FIELDS))
    return _render(_to_codes(attributes), theta, size, occ, occluder_p, rng, noise_sigma, world)
