"""Typed experiment configuration: one schema, YAML files, ``--set a.b=c`` overrides.

Every option is declared here with its default and meaning; the README's configuration reference is
generated from these declarations (``stablerep-ray config-reference``). Validation happens before Ray
starts, so a bad config costs a second, not a GPU reservation. Errors name the key and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration problem a user must fix; the message names the key (or file) and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CaptionsConfig(_Section):
    source: str = Field(
        "",
        description="Caption file or directory: local path or pyarrow filesystem URI (s3://, gs://). "
        "Formats: .txt (one caption per line), .csv, .tsv, .jsonl, .parquet.",
    )
    format: Literal["auto", "txt", "csv", "tsv", "jsonl", "parquet"] = Field(
        "auto", description="File format; 'auto' picks it from the file extension."
    )
    column: str = Field("caption", description="Caption column for csv/tsv/jsonl/parquet sources.")
    max_chars: int = Field(
        2000,
        gt=0,
        description="Captions longer than this are rejected up front (a sign of a wrong column or "
        "a binary file); the text encoder truncates to its own context anyway.",
    )
    repeat: bool = Field(
        True, description="Cycle through the source again when a run needs more captions than it holds."
    )
    rows_per_block: int = Field(256, gt=0, description="Captions per Ray Data block read from the source.")


class GeneratorConfig(_Section):
    backend: Literal["diffusers", "simulator"] = Field(
        "diffusers",
        description="'diffusers': a Stable Diffusion pipeline loaded with from_pretrained(model). "
        "'simulator': the procedural offline text-to-image simulator (development, CI, demos).",
    )
    model: str = Field(
        "",
        description="Hugging Face model id or local directory of a diffusers text-to-image pipeline "
        "(diffusers backend only). `stablerep-ray make-tiny-pipeline DIR` builds an offline one.",
    )
    scheduler: Literal["dpm_solver++", "ddim", "euler", "euler_ancestral", "pndm", "pipeline"] = Field(
        "dpm_solver++", description="Sampler; 'pipeline' keeps the checkpoint's own scheduler."
    )
    steps: int = Field(20, gt=0, description="Denoising steps per image.")
    guidance_scale: float = Field(
        2.0, ge=0, description="Classifier-free guidance scale w (StableRep uses 2; SynCLR 2.5)."
    )
    resolution: int = Field(512, gt=0, description="Generation resolution in pixels (multiple of 8).")
    output_size: int = Field(
        256, gt=0, description="Stored (streamed) resolution: generated images are resized to this."
    )
    images_per_caption: int = Field(
        10, gt=0, description="n: images generated per caption (the batch draws m of them)."
    )
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="Pipeline dtype; 'auto' is bf16 on GPU and fp32 on CPU."
    )
    safety_checker: bool = Field(
        False,
        description="Run the pipeline's safety checker; flagged images are dropped and counted, "
        "never streamed as black images.",
    )
    seed: int = Field(0, ge=0, description="Base seed; image j of caption c uses seed(base, c, j).")
    num_actors: int = Field(1, gt=0, description="Generator actors in the fixed-size Ray Data pool.")
    num_gpus_per_actor: float = Field(
        0.0, ge=0, description="GPUs per generator actor (fractions share a large card)."
    )
    num_cpus_per_actor: float = Field(1.0, ge=0, description="CPUs per generator actor.")
    captions_per_call: int = Field(
        4,
        gt=0,
        description="Captions per generator call (batch = captions_per_call x n images); one call is one "
        "stream block, so keep a call >= 0.5 s (`stablerep-ray plan` warns when shorter).",
    )
    channels_last: bool = Field(True, description="channels_last memory format for UNet and VAE (GPU).")
    compile: bool = Field(False, description="torch.compile the UNet (GPU; warm-up on the first call).")
    vae_slicing: bool = Field(False, description="Decode latents one image at a time to bound memory.")
    label_selector: dict[str, str] = Field(
        default_factory=dict,
        description="Ray node labels generator actors must land on, e.g. {ray.io/node-group: gen}.",
    )


class StreamConfig(_Section):
    images_per_group: int = Field(
        6, gt=0, description="m: images of one caption in a batch, drawn afresh from its n each time."
    )
    reuse: int = Field(
        1,
        gt=0,
        description="R: times a caption group is served before eviction from the worker's replay "
        "buffer (1 = pure streaming, each group used exactly once).",
    )
    buffer_mb: float = Field(
        1024.0, gt=0, description="Memory cap of each train worker's replay buffer, in MiB."
    )
    prefetch_batches: int = Field(2, ge=0, description="Ray Data batches prefetched by each worker.")
    object_store_mb: float = Field(
        0.0,
        ge=0,
        description="Object-store budget of the generation stream (Ray Data), in MiB. 0 = auto: "
        "room for every generator actor's calls in flight and each worker's prefetched batches, "
        "twice over, at least 64 MiB. Without a cap, generators faster than the trainer run ahead "
        "into half the object store, which then spills to disk.",
    )
    log_consumed: bool = Field(
        False,
        description="Append each step's served stream keys and caption ids to "
        "output_dir/name/consumed/*.jsonl: an audit of which captions the model saw.",
    )


class TextTowerConfig(_Section):
    width: int = Field(512, gt=0, description="Text Transformer width.")
    layers: int = Field(12, gt=0, description="Text Transformer layers.")
    heads: int = Field(8, gt=0, description="Text Transformer attention heads.")
    context_length: int = Field(77, gt=0, description="Token context length.")
    tokenizer: str = Field(
        "",
        description="Tokenizer path or id; empty takes the generator pipeline's tokenizer "
        "(the simulator uses a built-in word tokenizer).",
    )


class ModelConfig(_Section):
    name: str = Field("vit_base_patch16_224", description="timm model name of the image encoder.")
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra timm.create_model kwargs (e.g. depth, patch_size)."
    )
    image_size: int = Field(224, gt=0, description="Training crop size fed to the encoder.")
    head_hidden_dim: int = Field(4096, gt=0, description="Projection MLP hidden width.")
    head_layers: int = Field(3, ge=1, description="Projection MLP linear layers (BN+ReLU between).")
    embed_dim: int = Field(256, gt=0, description="Output dimension of the projection head.")
    text: TextTowerConfig = Field(default_factory=TextTowerConfig, description="StableRep+ text tower.")


class AugmentConfig(_Section):
    crop_scale: tuple[float, float] = Field((0.08, 1.0), description="RandomResizedCrop area range.")
    flip_p: float = Field(0.5, ge=0, le=1, description="Horizontal flip probability.")
    color_jitter: tuple[float, float, float, float] = Field(
        (0.4, 0.4, 0.4, 0.1), description="Brightness, contrast, saturation, hue jitter strengths."
    )
    color_jitter_p: float = Field(0.8, ge=0, le=1, description="Colour jitter probability.")
    grayscale_p: float = Field(0.2, ge=0, le=1, description="Grayscale probability.")
    blur_p: float = Field(0.5, ge=0, le=1, description="Gaussian blur probability.")
    blur_sigma: tuple[float, float] = Field((0.1, 2.0), description="Gaussian blur sigma range.")


class TrainConfig(_Section):
    objective: Literal["stablerep", "simclr", "stablerep_plus"] = Field(
        "stablerep",
        description="'stablerep': multi-positive loss over m images per caption; 'simclr': two views "
        "of one image; 'stablerep_plus': stablerep plus a CLIP-style image-text loss.",
    )
    batch_size: int = Field(
        8256, gt=0, description="Global images per step (all workers); a multiple of m x num_workers."
    )
    steps: int = Field(1000, gt=0, description="Optimiser steps in the run.")
    base_lr: float = Field(2e-4, gt=0, description="Learning rate per 256 images: lr = base_lr*batch/256.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (not on norms or biases).")
    betas: tuple[float, float] = Field((0.9, 0.98), description="AdamW betas.")
    warmup_steps: int = Field(100, ge=0, description="Linear warm-up steps before the cosine decay.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final lr as a fraction of the peak lr.")
    temperature: float = Field(0.1, gt=0, description="Contrastive temperature tau.")
    grad_clip: float | None = Field(None, gt=0, description="Clip the global grad norm (None: off).")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="Autocast dtype; 'auto' is bf16 on GPU, fp32 on CPU."
    )
    num_workers: int = Field(2, gt=0, description="DDP workers (Ray Train).")
    use_gpu: bool = Field(False, description="One GPU per train worker.")
    num_cpus_per_worker: float = Field(1.0, ge=0, description="CPUs per train worker.")
    label_selector: dict[str, str] = Field(
        default_factory=dict, description="Ray node labels train workers must land on."
    )
    seed: int = Field(0, ge=0, description="Seed for model init, augmentation and group sampling.")
    log_every: int = Field(10, gt=0, description="Steps between TensorBoard scalar writes.")
    image_grid_every: int = Field(
        0, ge=0, description="Steps between sample-grid images in TensorBoard (0: only the first step)."
    )
    checkpoint_every: int = Field(100, gt=0, description="Steps between checkpoints.")
    keep_checkpoints: int = Field(3, gt=0, description="Checkpoints kept on storage.")
    max_failures: int = Field(3, ge=-1, description="Worker-group restarts from the last checkpoint.")


class EvalConfig(_Section):
    data: str = Field(
        "",
        description="Labelled evaluation images: ImageFolder dir, parquet (image bytes + label), or "
        "'simulator:<attribute>' for the simulator's held-out set. Empty: no online evaluation. "
        "'TRAIN:TEST' splits into a memory bank and a query set.",
    )
    every: int = Field(0, ge=0, description="Steps between online kNN evaluations (0: only at the end).")
    knn_k: int = Field(20, gt=0, description="Neighbours in the kNN classifier.")
    knn_temperature: float = Field(0.07, gt=0, description="Temperature of the kNN vote weights.")
    batch_size: int = Field(256, gt=0, description="Images per feature-extraction batch.")
    max_images: int = Field(0, ge=0, description="Cap on evaluation images (0: all).")


class ClusterConfig(_Section):
    address: str = Field(
        "",
        description="Ray cluster address; empty uses RAY_ADDRESS if set, else starts a local Ray.",
    )
    num_cpus: int = Field(0, ge=0, description="Logical CPUs of a local Ray (0: the machine's count).")
    num_gpus: int = Field(-1, ge=-1, description="GPUs of a local Ray (-1: detect).")
    storage_path: str = Field(
        "", description="Shared storage for checkpoints (s3://, gs://, NFS); empty: output_dir."
    )


class TuneParam(_Section):
    """One swept key of ``tune.space``: exactly one form. A bare list is short for ``grid``."""

    grid: list[Any] | None = Field(None, description="Run every value (Tune grid_search).")
    choice: list[Any] | None = Field(None, description="Draw uniformly from these values (num_samples draws).")
    uniform: tuple[float, float] | None = Field(None, description="Draw uniformly in [low, high].")
    loguniform: tuple[float, float] | None = Field(None, description="Draw log-uniformly in [low, high].")
    randint: tuple[int, int] | None = Field(None, description="Draw an integer in [low, high) (high excluded).")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"grid": data} if isinstance(data, list) else data

    @model_validator(mode="after")
    def _one_form(self) -> "TuneParam":
        forms = [name for name in TuneParam.model_fields if getattr(self, name) is not None]
        if len(forms) != 1:
            raise ValueError(
                "give exactly one of grid / choice / uniform / loguniform / randint "
                f"(got {forms or 'none'}), e.g. {{grid: [2.0, 8.0]}}"
            )
        form = forms[0]
        value = getattr(self, form)
        if form in ("grid", "choice") and not value:
            raise ValueError(f"{form}: list at least one value")
        if form in ("uniform", "loguniform", "randint") and not value[0] < value[1]:
            raise ValueError(f"{form}: need low < high, got {list(value)}")
        if form == "loguniform" and value[0] <= 0:
            raise ValueError(f"loguniform: need 0 < low, got {list(value)}")
        return self

    @property
    def form(self) -> str:
        return next(name for name in TuneParam.model_fields if getattr(self, name) is not None)


class TuneBudgetConfig(_Section):
    steps: int = Field(0, ge=0, description="Optimiser steps per trial, equal for all trials; 0: train.steps.")
    images: int = Field(
        0,
        ge=0,
        description="Images seen per trial instead of steps: steps = images / train.batch_size "
        "(the global batch is the same for every trial).",
    )

    @model_validator(mode="after")
    def _one_unit(self) -> "TuneBudgetConfig":
        if self.steps and self.images:
            raise ValueError("set either steps or images, not both")
        return self


class TuneSchedulerConfig(_Section):
    type: Literal["asha", "none"] = Field(
        "asha", description="'asha': early-stop weak trials (ASHA); 'none': every trial runs its budget."
    )
    grace_period: int = Field(
        0, ge=0, description="Steps every trial runs before ASHA may stop it; 0: a quarter of the budget."
    )
    reduction_factor: float = Field(
        2.0, gt=1, description="ASHA keeps the best 1/reduction_factor of the trials at each rung."
    )


class TuneConfig(_Section):
    name: str = Field(
        "", description="Sweep name: output_dir/name holds the Tune experiment; empty: '<name>-sweep'."
    )
    space: dict[str, TuneParam] = Field(
        default_factory=dict,
        description="Swept keys (dotted config keys, e.g. generator.guidance_scale) -> "
        "{grid|choice|uniform|loguniform|randint: ...}; a bare list is a grid.",
    )
    seeds: list[int] = Field(
        default_factory=lambda: [0],
        description="Every point runs once per seed (an int N means seeds 0..N-1); results report the "
        "mean and spread over seeds.",
    )
    seed_keys: list[str] = Field(
        default_factory=lambda: ["train.seed", "generator.seed"],
        description="Config keys set to the trial's seed.",
    )
    num_samples: int = Field(
        1, gt=0, description="Draws of the random forms (choice/uniform/...); each draw runs the whole grid."
    )
    search_seed: int = Field(0, ge=0, description="Seed of those draws (a sweep is reproducible).")
    metric: str = Field("eval/knn_top1", description="Reported metric to compare trials by.")
    mode: Literal["max", "min"] = Field("max", description="Whether a larger metric is better.")
    budget: TuneBudgetConfig = Field(default_factory=TuneBudgetConfig)
    scheduler: TuneSchedulerConfig = Field(default_factory=TuneSchedulerConfig)
    max_concurrent_trials: int = Field(
        0, ge=0, description="Trials at once; 0: as many as fit the cluster (a larger value is lowered)."
    )
    driver_cpus: float = Field(
        0.5, gt=0, description="CPUs reserved for each trial's driver (the Tune function that fits it)."
    )
    max_failures: int = Field(0, ge=0, description="Tune-level restarts of a failed trial.")

    @model_validator(mode="before")
    @classmethod
    def _seed_count(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("seeds"), int):
            if data["seeds"] < 1:
                raise ValueError(f"seeds: need at least 1 seed, got {data['seeds']}")
            data = {**data, "seeds": list(range(data["seeds"]))}
        return data

    @model_validator(mode="after")
    def _check(self) -> "TuneConfig":
        if not self.seeds:
            raise ValueError("seeds: list at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: seeds repeat in {self.seeds}")
        return self


class Config(_Section):
    name: str = Field("stablerep", description="Run name: output_dir/name holds checkpoints and logs.")
    output_dir: str = Field("outputs", description="Local directory for logs, TensorBoard and results.")
    captions: CaptionsConfig = Field(default_factory=CaptionsConfig)
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    stream: StreamConfig = Field(default_factory=StreamConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    tune: TuneConfig = Field(
        default_factory=TuneConfig, description="Sweep definition for `stablerep-ray tune` (docs/tuning.md)."
    )

    @model_validator(mode="after")
    def _check_consistency(self) -> "Config":
        m = self.stream.images_per_group
        n = self.generator.images_per_caption
        objective = self.train.objective
        if objective != "simclr" and m < 2:
            raise ValueError(
                f"stream.images_per_group: the '{objective}' objective needs at least 2 images per "
                f"caption to form positives (got {m}); set it to 2 or more, or use train.objective=simclr"
            )
        if m > n:
            raise ValueError(
                f"stream.images_per_group: m={m} exceeds generator.images_per_caption={n}; "
                f"generate at least m images per caption"
            )
        per_step = self.group_size * self.train.num_workers
        if self.train.batch_size % per_step:
            unit = "2 views x " if objective == "simclr" else "stream.images_per_group x "
            raise ValueError(
                f"train.batch_size: {self.train.batch_size} images must be a multiple of "
                f"{unit}train.num_workers = {per_step} so every worker gets whole caption groups; "
                f"try {max(per_step, self.train.batch_size // per_step * per_step)}"
            )
        if self.generator.backend == "diffusers" and not self.generator.model:
            raise ValueError(
                "generator.model: the diffusers backend needs a model id or local pipeline directory "
                "(build an offline one with `stablerep-ray make-tiny-pipeline DIR`)"
            )
        if self.generator.backend == "diffusers" and self.generator.resolution % 8:
            raise ValueError(
                f"generator.resolution: {self.generator.resolution} must be a multiple of 8"
            )
        if not self.captions.source:
            raise ValueError("captions.source: set a caption file, directory or URI")
        lo, hi = self.augment.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"augment.crop_scale: need 0 < low <= high <= 1, got {lo, hi}")
        return self

    # -- derived quantities used across stages ------------------------------------------------
    @property
    def group_size(self) -> int:
        """Encoder inputs per caption in a batch: m images (one view each), or SimCLR's 2 views of 1."""
        return 2 if self.train.objective == "simclr" else self.stream.images_per_group

    @property
    def images_drawn_per_group(self) -> int:
        """Distinct generated images drawn from a caption's n per serve."""
        return 1 if self.train.objective == "simclr" else self.stream.images_per_group

    @property
    def captions_per_worker_step(self) -> int:
        return self.train.batch_size // (self.group_size * self.train.num_workers)

    @property
    def stream_object_store_bytes(self) -> int:
        """``stream.object_store_mb`` in bytes, or the auto budget (see its description)."""
        if self.stream.object_store_mb:
            return int(self.stream.object_store_mb * 2**20)
        g = self.generator
        row = g.images_per_caption * g.output_size**2 * 3  # one caption's images, uint8
        in_flight = g.num_actors * 2 * g.captions_per_call * row  # Ray Data: 2 calls per actor
        prefetched = self.train.num_workers * (self.stream.prefetch_batches + 2) * self.captions_per_worker_step * row
        return max(64 * 2**20, 2 * (in_flight + prefetched))

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir).expanduser().resolve() / self.name


# --------------------------------------------------------------------------------------------------
def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.steps=100")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=c`` overrides (values parsed as YAML) to a nested dict."""
    for item in overrides or []:
        path, value = _parse_override(item)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
        node[path[-1]] = value
    return data


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"{key}: unknown key; check the spelling (`stablerep-ray config-reference` lists all keys)"
    if not key:  # model-level validator: the message already starts with the key
        return msg
    got = first.get("input")
    return f"{key}: {msg} (got {got!r})" if not isinstance(got, dict) else f"{key}: {msg}"


def from_dict(data: dict) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config, apply ``--set`` overrides and validate; relative paths are kept as given."""
    data: dict = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return from_dict(apply_overrides(data, overrides or []))


def dump_config(config: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def reference_markdown() -> str:
    """The configuration reference: every key, its default and meaning, from the schema itself."""
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name}.")
                continue
            default = field.get_default(call_default_factory=True)
            lines.append(f"| `{prefix}{name}` | `{default!r}` | {field.description or ''} |")

    walk(Config, "")
    return "\n".join(lines)
