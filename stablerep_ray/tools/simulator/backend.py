"""The generation backend: captions to groups of images, with the Stable Diffusion backend's contract.

:class:`SimulatorGenerator` is what the generator backend registry names
(``stablerep_ray.tools.simulator:SimulatorGenerator``); :func:`generate_caption_images` is the
per-caption work it does. This is where the guidance scale becomes per-image randomness: a caption
mode, per-image nuisance pulled towards it, semantic mismatches, occluders and noise, each drawn in a
fixed order from a seed of ``(seed, caption id, image index)`` alone so an image never depends on the
batch it is generated in.
"""

from __future__ import annotations

import numpy as np

from ...config import GeneratorConfig
from ...generation.backends import image_keys
from .render import _NUISANCE_DIM, _NUM_OCC_SLOTS, _OCC_FIELDS, _render
from .world import (
    _ATTR_NAMES,
    _ATTR_SIZES,
    _KEY_MODE,
    _KEY_UNNAMED,
    _OCCLUDER_P,
    ATTRIBUTES,
    DIVERSITY_W0,
    MISMATCH_P0,
    World,
    _parse_codes,
    _seq,
    diversity_scale,
    get_world,
    mismatch_probability,
)


def _caption_mode(seed: int, caption_id: int) -> np.ndarray:
    return np.random.default_rng(_seq([seed, caption_id], _KEY_MODE)).uniform(-1, 1, _NUISANCE_DIM)


def _generate_one(
    codes: np.ndarray,
    named: np.ndarray,
    mode: np.ndarray,
    seed: int,
    caption_id: int,
    j: int,
    p_mis: float,
    d: float,
    size: int,
    world: World,
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(_seq([seed, caption_id, j]))
    # fixed draw order and count, whatever w is (common random numbers across guidance scales)
    u_mis = rng.random(len(_ATTR_SIZES))
    offset = rng.integers(1, _ATTR_SIZES)
    eps = rng.uniform(-1, 1, _NUISANCE_DIM)
    occ = rng.random((_NUM_OCC_SLOTS, _OCC_FIELDS))
    used = np.where(u_mis < p_mis, (codes + offset) % _ATTR_SIZES, codes)
    if world.unnamed == "image" and not named.all():
        drawn = np.random.default_rng(_seq([seed, caption_id, j], _KEY_UNNAMED)).integers(0, _ATTR_SIZES)
        used = np.where(named, used, drawn)
    world.apply_fixed(used)
    theta = mode + d * (eps - mode)
    sigma = (2.0 + 6.0 * d) / 255.0
    return _render(used, theta, size, occ, _OCCLUDER_P * d, rng, sigma, world), used


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
    image_key: int | None = None,
    world: str | World = "default",
):
    """Images ``0..num_images-1`` of one caption: uint8 ``(num_images, size, size, 3)``.

    The caption's mode comes from ``caption_id`` (the text; the row's ``image_key`` in a world with
    per-row modes); each image's own randomness from ``image_key`` (the row's source position; default
    ``caption_id``), as a diffusion model draws new images of the same prompt from new seeds.
    ``world`` (a name in ``WORLDS``) sets the nuisance, the fixed attributes and what an attribute the
    caption leaves out becomes.

    With ``return_attributes`` also returns the attributes each image was *actually* rendered with
    (a list of dicts; they differ from ``parse_caption(caption)`` where a semantic mismatch hit).
    """
    codes, named = (np.asarray(x) for x in _parse_codes(str(caption)))
    world = get_world(world)
    key = caption_id if image_key is None else image_key
    mode = _caption_mode(seed, caption_id if world.modes == "caption" else key)
    p_mis = mismatch_probability(guidance_scale, mismatch_p0)
    d = diversity_scale(guidance_scale, diversity_w0)
    images = np.empty((num_images, size, size, 3), dtype=np.uint8)
    used_all = []
    for j in range(num_images):
        images[j], used = _generate_one(codes, named, mode, seed, key, j, p_mis, d, size, world)
        used_all.append(used)
    if not return_attributes:
        return images
    return images, [{a: ATTRIBUTES[a][k] for a, k in zip(_ATTR_NAMES, u)} for u in used_all]


class SimulatorGenerator:
    """Ray Data ``map_batches`` callable (``batch_format="numpy"``) with the diffusers backend's contract.

    Input columns: ``caption_id`` (int64), ``caption`` (str) and optionally ``position`` (int64) and
    ``source_pass`` (their ``image_keys`` seed the images; default the caption id); every other column is passed through
    unchanged. Added columns: ``images`` uint8 ``(B, n, H, W, 3)`` with ``n = images_per_caption`` and
    ``H = W = output_size``, and ``num_images`` int32 ``(B,)`` (always ``n``: the simulator has no
    safety checker that drops images). Image ``j`` of a row depends only on ``(config.seed,
    image key, j)``, the caption (text and id) and ``guidance_scale``.
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
        self.world = get_world(config.world)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for col in ("caption_id", "caption"):
            if col not in batch:
                raise KeyError(f"SimulatorGenerator: input batch lacks the {col!r} column")
        ids = np.asarray(batch["caption_id"]).astype(np.int64, copy=False)
        keys = image_keys(batch)
        keys = ids if keys is None else keys
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
                mismatch_p0=self.mismatch_p0, diversity_w0=self.diversity_w0, image_key=int(keys[b]),
                world=self.world,
            )  # fmt: skip
        out = dict(batch)
        out["images"] = images
        out["num_images"] = np.full(B, n, dtype=np.int32)
        return out
