"""The whole experiment config: its sections, the checks across them, and derived quantities."""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import Field, model_validator

from ..training.objectives import get_objective
from .objectives import SynCLRConfig
from .sections import (
    MIX_FACTOR,
    AugmentConfig,
    CaptionsConfig,
    ClusterConfig,
    EvalConfig,
    GeneratorConfig,
    ModelConfig,
    StreamConfig,
    TrainConfig,
    _Section,
)
from .synth import SYNTH_SOURCE
from .tune import TuneConfig


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
    synclr: SynCLRConfig = Field(
        default_factory=SynCLRConfig, description="SynCLR's teacher, crops and masking (train.objective=synclr)."
    )
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    tune: TuneConfig = Field(
        default_factory=TuneConfig, description="Sweep definition for `stablerep-ray tune` (docs/tuning.md)."
    )

    @model_validator(mode="after")
    def _check_consistency(self) -> Config:
        objective = get_objective(self.train.objective)
        objective.check_config(self)
        m, n = self.stream.images_per_group, self.generator.images_per_caption
        if m > n:
            raise ValueError(
                f"stream.images_per_group: m={m} exceeds generator.images_per_caption={n}; "
                f"generate at least m images per caption"
            )
        per_step = self.group_size * self.train.num_workers
        if self.train.batch_size % per_step:
            raise ValueError(
                f"train.batch_size: {self.train.batch_size} images must be a multiple of "
                f"{objective.batch_unit()} x train.num_workers = {per_step} so every worker gets whole "
                f"caption groups; try {max(per_step, self.train.batch_size // per_step * per_step)}"
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
        self._check_buffer()
        if not self.captions.source:
            raise ValueError(f"captions.source: set a caption file, directory or URI, or {SYNTH_SOURCE!r}")
        if self.captions.source == SYNTH_SOURCE:
            self.captions.synth.check()
        t = self.train
        if t.use_gpu and t.gpus_per_worker < 1 and t.num_workers > 1:
            raise ValueError(
                f"train.gpus_per_worker: {t.gpus_per_worker:g} lets Ray place several DDP ranks on one GPU, "
                f"which NCCL refuses; set train.num_workers=1 (one GPU shared with the generators) or "
                f"train.gpus_per_worker=1"
            )
        lo, hi = self.augment.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"augment.crop_scale: need 0 < low <= high <= 1, got {lo, hi}")
        return self

    def _check_buffer(self) -> None:
        """The replay buffer must hold one step's groups, and R steps' worth for reuse to mix."""
        k, reuse, groups = self.captions_per_worker_step, self.stream.reuse, self.buffer_groups
        need = k if reuse == 1 else reuse * k
        if groups < need:
            mib = math.ceil(need * self.group_bytes / 2**20)
            why = "one step's" if reuse == 1 else f"stream.reuse={reuse} x one step's"
            raise ValueError(
                f"stream.buffer_mb: {self.stream.buffer_mb:g} MiB holds {groups} caption groups of "
                f"{self.generator.images_per_caption} images per worker, fewer than {why} {k} groups; "
                f"set it to at least {mib} or to 0 (auto)"
            )

    # -- derived quantities used across stages ------------------------------------------------
    @property
    def group_size(self) -> int:
        """Encoder inputs per caption group in a batch (the objective's views of its drawn images)."""
        return get_objective(self.train.objective).inputs_per_group(self)

    @property
    def images_drawn_per_group(self) -> int:
        """Distinct generated images drawn from a caption's n per serve."""
        return get_objective(self.train.objective).images_drawn_per_group(self)

    @property
    def peak_lr(self) -> float:
        """The learning rate after warm-up (``train.lr_scaling`` of ``train.base_lr``)."""
        t = self.train
        return t.base_lr * t.batch_size / 256 / (2 if t.lr_scaling == "authors" else 1)

    @property
    def captions_per_worker_step(self) -> int:
        return self.train.batch_size // (self.group_size * self.train.num_workers)

    @property
    def group_bytes(self) -> int:
        """Bytes of one caption group in the stream: n images at the stored size, uint8 RGB."""
        return self.generator.images_per_caption * self.generator.output_size**2 * 3

    @property
    def buffer_groups(self) -> int:
        """Caption groups each worker's replay buffer holds (``stream.buffer_mb``, or auto)."""
        if self.stream.buffer_mb:
            return int(self.stream.buffer_mb * 2**20 // self.group_bytes)
        k, reuse = self.captions_per_worker_step, self.stream.reuse
        return k if reuse == 1 else MIX_FACTOR * reuse * k

    @property
    def stream_object_store_bytes(self) -> int:
        """``stream.object_store_mb`` in bytes, or the auto budget (see its description)."""
        if self.stream.object_store_mb:
            return int(self.stream.object_store_mb * 2**20)
        g = self.generator
        row = self.group_bytes
        in_flight = g.num_actors * 2 * g.captions_per_call * row  # Ray Data: 2 calls per actor
        prefetched = self.train.num_workers * (self.stream.prefetch_batches + 2) * self.captions_per_worker_step * row
        return max(64 * 2**20, 2 * (in_flight + prefetched))

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir).expanduser().resolve() / self.name
