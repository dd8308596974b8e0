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
captions are meaningful). The renderer (numpy + PIL, fractions of a millisecond per small image) draws the
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

Worlds
------
A world (:data:`WORLDS`, ``generator.world``) sets how much nuisance the renderer adds and what an
attribute a caption leaves out becomes. ``default``: everything above, and an unnamed attribute is
fixed per caption (from its text). ``simple``: one solid object (texture and count fixed), smaller
and upright within +-36 degrees, no occluders, unnamed attributes drawn afresh per image (as a
diffusion model varies a colour its prompt leaves open) and a nuisance mode per stream row rather
than per caption text. Colour is learnable in CPU minutes in both; shape only in ``simple``
(docs/learning.md). Evaluation sets render in a world too (``simulator:shape:simple``).

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
:func:`render_eval_set`, :func:`render_eval_image`, :func:`write_image_folder`.

Modules
-------
``world`` (vocabularies, captions, parsing, the guidance formulas), ``render`` (shapes, textures,
lighting: codes and ``theta`` to pixels), ``backend`` (per-caption generation and
:class:`SimulatorGenerator`), ``eval_sets`` (held-out labelled sets). This package re-exports their
public names (and the private ones the tests read), so callers import from
``stablerep_ray.tools.simulator`` only.
"""

from __future__ import annotations

from .backend import SimulatorGenerator, generate_caption_images
from .eval_sets import render_eval_image, render_eval_set, write_image_folder
from .render import _COLOR_RGB, render_attributes  # noqa: F401  (_COLOR_RGB: read by the tests)
from .world import (  # noqa: F401  (the private names: read by the tests)
    _ONE_WORDS,
    _TEMPLATES,
    ATTRIBUTES,
    BACKGROUNDS,
    COLORS,
    COUNTS,
    DIVERSITY_W0,
    MISMATCH_P0,
    SHAPES,
    TEXTURES,
    WORLDS,
    World,
    _caption_text,
    _parse_codes,
    caption_words,
    diversity_scale,
    make_captions,
    mismatch_probability,
    parse_caption,
)

__all__ = [
    "ATTRIBUTES",
    "SHAPES",
    "COLORS",
    "TEXTURES",
    "BACKGROUNDS",
    "COUNTS",
    "WORLDS",
    "World",
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
    "render_eval_image",
    "render_eval_set",
    "write_image_folder",
]
