"""The ``captions.synth`` section: captions written from concept lists, by rule or by a language model.

Used when ``captions.source`` is ``synth`` (SynCLR's "learning from models": no real caption at all).
Only what can be checked without reading a file is checked here; the concept files are read by the
train preflight (``captions.synth.check_pools``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from .base import ConfigError, _Section

SYNTH_SOURCE = "synth"

# The prompt kinds, and SynCLR's mix of them: 91 % foreground (44 % concept alone, 45 % concept with
# a background, 11 % concept with a spatial relation), 8.8 % background only, 0.2 % texture only.
PROMPT_KINDS = ("concept", "concept_background", "concept_relation", "background", "texture")
SYNCLR_MIX = {
    "concept": 0.4004, "concept_background": 0.4095, "concept_relation": 0.1001, "background": 0.088,
    "texture": 0.002,
}  # fmt: skip
SPATIAL_RELATIONS = [
    "next to", "on top of", "under", "behind", "in front of", "inside", "beside", "above", "near",
    "to the left of",
]  # fmt: skip
CONCEPT_KINDS = ("concept", "concept_background", "concept_relation")
MODEL_BACKENDS = ("transformers", "http", "vllm")


class SynthConfig(_Section):
    backend: Literal["template", "transformers", "http", "vllm"] = Field(
        "template",
        description="Who writes the captions. 'template': no model, the prompt kinds filled by rule (offline, "
        "what the simulator and CI learn from); 'transformers': a Ray Data actor pool holding "
        "AutoModelForCausalLM.from_pretrained(model); 'http': an OpenAI-compatible /v1/completions server "
        "through Ray Data LLM's HTTP processor; 'vllm': Ray Data LLM's vLLM engine processor (GPUs).",
    )
    concepts: list[str] = Field(
        default_factory=list,
        description="Foreground concept files (local paths or URIs): .txt with one concept per line, or "
        ".json mapping each concept to its own backgrounds (e.g. a file of ImageNet-21k class names).",
    )
    concept_weights: list[float] = Field(
        default_factory=list,
        description="Share of foreground prompts drawn from each concepts file (SynCLR: ImageNet-1k 50 %, "
        "ImageNet-21k 30 %, ...); empty: equal per file.",
    )
    backgrounds: str = Field(
        "",
        description="File of backgrounds or places, one per line: the 'background' prompt kind, and the "
        "'concept_background' kind for concepts without backgrounds of their own.",
    )
    textures: str = Field("", description="File of texture names, one per line (the 'texture' prompt kind).")
    relations: list[str] = Field(
        default_factory=lambda: list(SPATIAL_RELATIONS),
        description="Spatial relations of the 'concept_relation' prompt kind.",
    )
    mix: dict[str, float] = Field(
        default_factory=lambda: dict(SYNCLR_MIX),
        description="Prompt kind -> weight (normalised). Kinds: concept, concept_background, concept_relation, "
        "background, texture. Default: SynCLR's mix.",
    )
    examples: str = Field(
        "",
        description="JSON or YAML file: prompt kind -> list of 'input => caption' lines, the in-context "
        "examples of that kind (replacing the built-in pool for the kinds it names).",
    )
    num_examples: int = Field(3, ge=0, description="k: in-context examples drawn for each prompt.")
    seed: int = Field(0, ge=0, description="Prompt i is a pure function of (seed, i): a restart resumes at an index.")
    prompts_per_chunk: int = Field(
        256,
        gt=0,
        description="Prompt indices per stream chunk, the unit a checkpoint resumes from: a restart writes "
        "again at most the chunks that were in flight.",
    )
    model: str = Field(
        "",
        description="Language model: Hugging Face id or local directory (transformers, vllm; "
        "`stablerep-ray make-tiny-llm DIR` builds an offline one); for http, the model name sent to the server.",
    )
    url: str = Field("", description="http: the OpenAI-compatible completions URL, e.g. http://host:8000/v1/completions.")
    api_key_env: str = Field(
        "", description="http: environment variable holding a bearer token sent with each request (empty: none)."
    )
    qps: int = Field(0, ge=0, description="http: requests per second per actor at most (0: no limit).")
    temperature: float = Field(0.8, ge=0, description="Sampling temperature (SynCLR: 0.8; 0: greedy).")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling mass (SynCLR: 0.9).")
    max_tokens: int = Field(100, gt=0, description="New tokens per completion at most; only its first line is kept.")
    max_chars: int = Field(
        300,
        gt=0,
        description="Completions longer than this (first line, normalised) are dropped and counted, like "
        "blank ones; Stable Diffusion's text encoder reads ~300 characters (77 tokens).",
    )
    batch_size: int = Field(32, gt=0, description="Prompts per language-model call.")
    num_actors: int = Field(1, gt=0, description="Language-model actors in the fixed-size pool (model backends).")
    num_gpus_per_actor: float = Field(
        0.0, ge=0, description="GPUs per language-model actor; vllm: a whole number is its tensor-parallel size, a "
        "fraction also scales vLLM's memory share (gpu_memory_utilization 0.9 x the fraction unless "
        "engine_kwargs sets it)."
    )
    num_cpus_per_actor: float = Field(1.0, ge=0, description="CPUs per language-model actor.")
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="transformers: model dtype; 'auto' is bf16 on GPU and fp32 on CPU."
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="vllm: extra engine arguments, e.g. {max_model_len: 2048}."
    )
    label_selector: dict[str, str] = Field(
        default_factory=dict, description="Ray node labels language-model actors must land on."
    )

    def check(self) -> None:
        """The checks that need no file: raises ConfigError naming the key (source ``synth`` only)."""
        key = "captions.synth"
        unknown = sorted(set(self.mix) - set(PROMPT_KINDS))
        if unknown:
            raise ConfigError(f"{key}.mix: unknown prompt kinds {unknown}; use {list(PROMPT_KINDS)}")
        if any(w < 0 for w in self.mix.values()) or sum(self.mix.values()) <= 0:
            raise ConfigError(f"{key}.mix: weights must be >= 0 with a positive sum (got {self.mix})")
        used = {kind for kind, w in self.mix.items() if w > 0}
        if used & set(CONCEPT_KINDS) and not self.concepts:
            raise ConfigError(f"{key}.concepts: the mix uses concept prompts; list at least one concepts file")
        if self.concept_weights and len(self.concept_weights) != len(self.concepts):
            raise ConfigError(
                f"{key}.concept_weights: {len(self.concept_weights)} weights for {len(self.concepts)} concepts "
                f"files; give one per file or none"
            )
        if self.concept_weights and (min(self.concept_weights) < 0 or sum(self.concept_weights) <= 0):
            raise ConfigError(f"{key}.concept_weights: weights must be >= 0 with a positive sum")
        if "texture" in used and not self.textures:
            raise ConfigError(f"{key}.textures: the mix uses texture prompts; set a textures file or drop the kind")
        if "concept_relation" in used and not self.relations:
            raise ConfigError(f"{key}.relations: the mix uses relation prompts; list relations or drop the kind")
        if self.backend in ("transformers", "vllm") and not self.model:
            raise ConfigError(
                f"{key}.model: the {self.backend} backend needs a model id or local directory "
                f"(an offline one: `stablerep-ray make-tiny-llm DIR`)"
            )
        if self.backend == "http" and not self.url.startswith(("http://", "https://")):
            raise ConfigError(
                f"{key}.url: the http backend needs the server's completions URL, "
                f"e.g. http://127.0.0.1:8000/v1/completions (got {self.url!r})"
            )
        if self.backend == "vllm":
            gpus = self.num_gpus_per_actor
            if gpus <= 0 or (gpus > 1 and gpus != int(gpus)):
                raise ConfigError(
                    f"{key}.num_gpus_per_actor: vLLM runs on GPUs: give a fraction of one GPU or a whole "
                    f"number (its tensor-parallel size), got {gpus:g}"
                )

    @property
    def uses_model(self) -> bool:
        return self.backend in MODEL_BACKENDS
