"""The simulator's world: what a caption can say and how guidance scale trades fidelity for variety.

Everything here is about *text* and the two guidance formulas, not pixels: the attribute vocabularies
(whose order fixes the integer codes every other module uses), the caption templates
(:func:`make_captions`), the parser that reads attributes back out of any text (:func:`parse_caption`),
the word list a word-level tokenizer needs (:func:`caption_words`) and the seed spaces. It is kept
apart from the renderer because the two change for different reasons: the caption language here, the
look of the images in ``render``; both meet only in the integer attribute codes.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

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
# worlds that render one solid object: captions name its colour, shape and background
_ONE_OBJECT_TEMPLATES = (
    "a {color} {shapes} on a {background} background",
    "a photo of a {color} {shapes} against a {background} background",
    "a {background} background with a {color} {shapes}",
    "an illustration of a {color} {shapes} on a {background} background",
)
# a caption that names only the shape: one text per shape, so all of a shape's rows share a caption id
_SHAPE_ONLY_TEMPLATE = "a photo of a {shapes}"


# --------------------------------------------------------------------------------------------------
# Worlds: how much nuisance the renderer adds and what a caption that leaves an attribute out means
@dataclass(frozen=True)
class World:
    """The rules one simulator world renders by (``generator.world``; the eval spec's world token).

    ``rotation``: largest object rotation in half-turns (1: any angle). ``scale``: object size against
    the default world's (a smaller object also moves over more of the image). ``occluders``: small neutral
    rectangles and discs over the scene. ``fixed``: attributes rendered at one value whatever the
    caption says. ``unnamed``: an attribute the caption does not name is ``"caption"``-fixed (from a
    hash of the text, so any caption source maps to learnable images) or drawn afresh for each
    ``"image"``, as a diffusion model does with a colour its prompt leaves open. ``modes``: the nuisance
    mode a group's images spread around (guidance scale sets how far) belongs to the ``"caption"``
    text or to the ``"row"`` (each time the caption appears in the stream); with a few captions
    repeated thousands of times, per-caption modes would tie each to one pose, place and lighting.
    """

    name: str
    rotation: float = 1.0
    scale: float = 1.0
    occluders: bool = True
    fixed: tuple[tuple[str, str], ...] = ()
    unnamed: str = "caption"
    modes: str = "caption"
    templates: tuple[str, ...] = _TEMPLATES

    @functools.cached_property
    def fixed_codes(self) -> dict[int, int]:
        """``{attribute index: code}`` of the attributes this world renders at one value."""
        return {_ATTR_NAMES.index(a): ATTRIBUTES[a].index(v) for a, v in self.fixed}

    def apply_fixed(self, codes: np.ndarray) -> np.ndarray:
        """``codes`` (last axis: attributes) with this world's fixed attributes set, in place."""
        for a, code in self.fixed_codes.items():
            codes[..., a] = code
        return codes


#: ``default``: everything varies (full rotation, textures, 1-3 objects, occluders); colour is
#: learnable in CPU minutes, shape is not. ``simple``: one solid object, upright within +-36 degrees,
#: no occluders, unnamed attributes drawn per image, a nuisance mode per row: shape is learnable in CPU
#: minutes from captions that name only the shape (docs/learning.md, "Colour, not shape").
WORLDS = {
    "default": World("default"),
    "simple": World(
        "simple", rotation=0.2, scale=0.75, occluders=False, fixed=(("texture", "solid"), ("count", "one")),
        unnamed="image", modes="row", templates=_ONE_OBJECT_TEMPLATES,
    ),
}  # fmt: skip


def get_world(world: str | World) -> World:
    if isinstance(world, World):
        return world
    try:
        return WORLDS[world]
    except KeyError:
        raise ValueError(f"simulator world {world!r} is not one of {sorted(WORLDS)}") from None


def _seq(entropy: list[int], key: int | None = None) -> np.random.SeedSequence:
    entropy = [int(e) & 0xFFFF_FFFF_FFFF_FFFF for e in entropy]  # SeedSequence needs non-negative
    if key is None:
        return np.random.SeedSequence(entropy)
    return np.random.SeedSequence(entropy, spawn_key=(key,))


_KEY_MODE, _KEY_EVAL, _KEY_CAPTIONS, _KEY_UNNAMED = 1, 2, 3, 4


def _caption_text(values: Mapping[str, str], template: int | str, one_word: str = "a") -> str:
    """``values`` written out by ``template`` (a format string, or an index into ``_TEMPLATES``)."""
    n = values["count"]
    shape = values["shape"]
    template = _TEMPLATES[template] if isinstance(template, int) else template
    text = template.format(
        count=one_word if n == "one" else n,
        color=values["color"],
        texture=values["texture"],
        pattern=_TEXTURE_PATTERN[values["texture"]],
        shapes=shape if n == "one" else _PLURAL[shape],
        background=values["background"],
    )
    return re.sub(r"\ba ([aeiou])", r"an \1", text)


def make_captions(
    num: int, seed: int = 0, world: str | World = "default", shape_only: float = 0.0, shape_only_first: int = 0
) -> list[str]:
    """``num`` templated captions with uniformly random attributes, deterministic in ``seed``.

    E.g. "two red striped stars on a blue background", "a photo of a dotted orange heart against a
    sand background"; in the ``simple`` world "a red star on a blue background" (its captions name
    only what it varies). :func:`parse_caption` recovers every attribute named. A ``shape_only`` share
    of them names only the shape ("a photo of a star"): in a world that draws unnamed attributes per
    image, such a caption's images share only their shape, so shape is what tells them apart. The
    first ``shape_only_first`` of them all name only the shape: read in order, they are a warm-up in
    which shape is learned before colour, the faster cue, can crowd it out.
    """
    world = get_world(world)
    rng = np.random.default_rng(_seq([seed], _KEY_CAPTIONS))
    codes = rng.integers(0, _ATTR_SIZES, size=(num, len(_ATTR_SIZES)))
    templates = rng.integers(0, len(world.templates), size=num)
    ones = rng.integers(0, len(_ONE_WORDS), size=num)
    only_shape = rng.random(num) < shape_only if shape_only > 0 else np.zeros(num, dtype=bool)
    only_shape[:shape_only_first] = True
    world.apply_fixed(codes)
    out = []
    for row, t, o, short in zip(codes, templates, ones, only_shape):
        values = {a: ATTRIBUTES[a][k] for a, k in zip(_ATTR_NAMES, row)}
        template = _SHAPE_ONLY_TEMPLATE if short else world.templates[t]
        out.append(_caption_text(values, template, _ONE_WORDS[o]))
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
    for t in _TEMPLATES + _ONE_OBJECT_TEMPLATES + (_SHAPE_ONLY_TEMPLATE,):
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
