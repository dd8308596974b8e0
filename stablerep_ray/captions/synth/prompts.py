"""Prompt i as a pure function of (seed, i), and the template backend's rule-written captions.

Everything prompt i holds (kind, concept, background or relation, its k in-context examples, the
sampling seed of its completion) is drawn from ``SeedSequence([seed, i])`` alone, in a fixed order.
So any worker can write any prompt, in any order, and a restarted run resumes at an index with no gap:
the stream is a sequence of prompt indices, never a file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...config import SynthConfig
from .examples import INSTRUCTIONS, SEPARATOR
from .pools import Pools


@dataclass(frozen=True)
class Prompt:
    index: int
    kind: str
    concept: str  # the concept; for the background and texture kinds, the background or the texture
    detail: str  # concept_background: the background; concept_relation: the relation; else ""
    other: str  # concept_relation: a second concept (the template backend's "something else")
    examples: tuple[str, ...]  # the k in-context "input => caption" lines
    seed: int  # the sampling seed of this prompt's completion

    @property
    def input(self) -> str:
        """The input line a model completes, written as the examples' inputs are."""
        return f"{self.concept}, {self.detail}" if self.detail else self.concept

    @property
    def text(self) -> str:
        """The whole prompt: the kind's instruction, the examples, then the input and '=>'."""
        return "\n".join([INSTRUCTIONS[self.kind], *self.examples, self.input + SEPARATOR.rstrip()])


def _concept(pools: Pools, rng: np.random.Generator) -> str:
    file = pools.concept_files[int(rng.choice(len(pools.concept_files), p=pools.file_weights))]
    return file[int(rng.integers(len(file)))]


def make_prompt(pools: Pools, cfg: SynthConfig, index: int) -> Prompt:
    """Prompt ``index`` of the stream (``cfg.seed``, the pools and the mix fix it completely)."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, index]))
    kind = pools.kinds[int(rng.choice(len(pools.kinds), p=pools.kind_weights))]
    detail = other = ""
    if kind == "background":
        concept = pools.backgrounds[int(rng.integers(len(pools.backgrounds)))]
    elif kind == "texture":
        concept = pools.textures[int(rng.integers(len(pools.textures)))]
    else:
        concept = _concept(pools, rng)
        if kind == "concept_background":
            own = pools.own_backgrounds.get(concept) or pools.backgrounds
            detail = own[int(rng.integers(len(own)))]
        elif kind == "concept_relation":
            detail = pools.relations[int(rng.integers(len(pools.relations)))]
            other = _concept(pools, rng)
    pool = pools.examples[kind]
    k = min(cfg.num_examples, len(pool))
    examples = tuple(pool[int(i)] for i in rng.choice(len(pool), size=k, replace=False))
    return Prompt(index, kind, concept, detail, other, examples, int(rng.integers(2**31)))


# -- the template backend: the prompt kinds filled by rule ------------------------------------------
RULES = {
    "concept": ("a photo of {x}", "{x}", "a close-up photo of {x}", "{x} in soft daylight",
                "a picture of {x}, seen from the side"),
    "concept_background": ("{x} in front of {b}", "a photo of {x} against {b}", "{x} with {b} behind it"),
    "concept_relation": ("{x} {r} {y}", "a photo of {x} {r} {y}"),
    "background": ("a photo of {b}", "a wide view of {b}", "{b} with nothing in front of it"),
    "texture": ("a close-up of a {t} surface", "a {t} pattern filling the frame", "{t} texture, seen straight on"),
}  # fmt: skip
_DETERMINERS = {"a", "an", "the", "one", "two", "three", "four", "some", "several", "many", "a pair"}


def with_article(phrase: str) -> str:
    """'red star' -> 'a red star', 'orange ring' -> 'an orange ring'; a phrase with a determiner is kept."""
    if phrase.split(" ", 1)[0].lower() in _DETERMINERS:
        return phrase
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def template_caption(prompt: Prompt) -> str:
    """The caption the template backend writes for a prompt: one of its kind's rules, drawn from its seed."""
    rules = RULES[prompt.kind]
    rule = rules[int(np.random.default_rng(prompt.seed).integers(len(rules)))]
    return rule.format(
        x=with_article(prompt.concept), b=with_article(prompt.detail or prompt.concept), r=prompt.detail,
        y=with_article(prompt.other), t=prompt.concept,
    )
