"""The sections of an experiment config, one class each, with every option's default and meaning."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from .base import ConfigError, _Section  # noqa: F401  (re-exported: the package and tune import them here)
from .synth import SynthConfig

#: The simulator's worlds (tools/simulator ``WORLDS`` defines them; a unit test keeps the two equal).
#: Named here, the one place the config, eval specs and the CLI read them from.
SIMULATOR_WORLDS = ("default", "simple")


class CaptionsConfig(_Section):
    source: str = Field(
        "",
        description="Caption file or directory: local path or pyarrow filesystem URI (s3://, gs://). "
        "Formats: .txt (one caption per line), .csv, .tsv, .jsonl, .parquet. 'synth': captions written "
        "from concept lists as the run goes (captions.synth; a file named synth: ./synth).",
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
        True,
        description="Cycle through the source again when a run needs more captions than it holds (each pass "
        "renders new images of its captions).",
    )
    rows_per_block: int = Field(256, gt=0, description="Captions per Ray Data block read from the source.")
    synth: SynthConfig = Field(
        default_factory=SynthConfig, description="Captions written from concept lists (source: synth)."
    )


class GeneratorConfig(_Section):
    backend: Literal["diffusers", "simulator"] = Field(
        "diffusers",
        description="'diffusers': a diffusers text-to-image pipeline loaded with from_pretrained(model). "
        "'simulator': the procedural offline text-to-image simulator (development, CI, demos).",
    )
    world: Literal[SIMULATOR_WORLDS] = Field(
        "default",
        description="Simulator backend: the world it renders. 'default': full rotation, textures, "
        "1-3 objects, occluders (colour is learnable in CPU minutes, shape is not); 'simple': one solid "
        "object upright within +-36 degrees, no occluders, and an attribute a caption leaves out "
        "drawn afresh per image (shape learnable in CPU minutes). Simulator eval sets name it: "
        "simulator:shape:simple.",
    )
    model: str = Field(
        "",
        description="Hugging Face model id or local directory of a diffusers text-to-image pipeline "
        "(diffusers backend only). `stablerep-ray make-tiny-pipeline DIR` builds an offline one.",
    )
    scheduler: Literal["dpm_solver++", "ddim", "euler", "euler_ancestral", "pndm", "pipeline"] = Field(
        "dpm_solver++",
        description="Sampler; 'pipeline' keeps the checkpoint's own scheduler (the only choice for "
        "flow-matching models: SD3, Flux, Sana).",
    )
    steps: int = Field(20, gt=0, description="Denoising steps per image.")
    guidance_scale: float = Field(
        2.0, ge=0, description="Classifier-free guidance scale w (StableRep uses 2; SynCLR 2.5); passed as "
        "the pipeline's true_cfg_scale where that is its guidance (Qwen-Image), as the guidance embedding for "
        "guidance-distilled models (FLUX.1-dev)."
    )
    resolution: int = Field(512, gt=0, description="Generation resolution in pixels (multiple of 8).")
    output_size: int = Field(
        256, gt=0, description="Stored (streamed) resolution: generated images are resized to this."
    )
    images_per_caption: int = Field(
        10, gt=0, description="n: images generated per caption (each serve draws m of them; with "
        "stream.reuse R, (1 - m/n)^R of them are never trained on, and the command warns above 10 %)."
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
    model_defaults: bool = Field(
        True,
        description="Where steps, guidance_scale, scheduler or resolution are left at these defaults, "
        "use the model's own: few-step models (SDXL-Turbo, SD3.5-Turbo, FLUX.1-schnell, FLUX.2-klein, "
        "Z-Image-Turbo, LCM) their "
        "steps, guidance and scheduler; flow-matching models their scheduler; every model its native "
        "resolution. Each change is logged; false keeps the config as written.",
    )
    channels_last: bool = Field(
        True, description="channels_last memory format for a UNet denoiser and the VAE (GPU)."
    )
    compile: bool = Field(
        False, description="torch.compile the denoiser, UNet or transformer (GPU; warm-up on the first call)."
    )
    vae_slicing: bool = Field(False, description="Decode latents one image at a time to bound memory.")
    vae_tiling: bool = Field(
        False, description="Decode latents in overlapping tiles to bound memory at high resolution."
    )
    label_selector: dict[str, str] = Field(
        default_factory=dict,
        description="Ray node labels generator actors must land on, e.g. {ray.io/node-group: gen}.",
    )


MIX_FACTOR = 2  # auto replay buffer at R > 1: MIX_FACTOR * R * K groups (consecutive batches share ~1/(2R))


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
        0.0,
        ge=0,
        description="Memory of each train worker's replay buffer, in MiB; it holds buffer_mb / (n x "
        "output_size^2 x 3 bytes) caption groups. 0 = auto: one step's groups at reuse 1, "
        f"{MIX_FACTOR} x reuse x one step's groups above, so a group's serves spread over many steps.",
    )
    prefetch_batches: int = Field(2, ge=0, description="Ray Data batches prefetched by each worker.")
    keep_order: bool = Field(
        True,
        description="Training sees the captions in stream order (a caption file's order, e.g. a "
        "curriculum; the same stream on a rerun). Generator calls run in parallel either way, but a "
        "finished call waits for the calls before it: off, a call lost with its actor (a preempted "
        "node) no longer holds back the rest of a large pool while the actor restarts.",
    )
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
    embed_dim: int = Field(
        512, gt=0, description="Joint image-text space: the text feature and a linear projection of the "
        "image CLS feature (not the SSL head's output) meet here, as in the authors' StableRep+.",
    )
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
    stem: Literal["patch", "conv"] = Field(
        "patch",
        description="How a ViT turns pixels into tokens: 'patch' (timm's one strided convolution) or "
        "'conv' (stride-2 3x3 convolutions with BatchNorm down to the patch grid, Xiao et al. 2021): "
        "small ViTs learn shape far faster with it (docs/learning.md). Not a timm architecture, so "
        "'export' refuses it.",
    )
    grad_checkpointing: bool = Field(
        False,
        description="Recompute each transformer block's activations in the backward pass instead of "
        "keeping them (timm's set_grad_checkpointing): one more forward pass of compute per step for a "
        "fraction of the activation memory, so a per-GPU batch that runs out of memory fits without "
        "changing train.batch_size.",
    )
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
    jitter_order: Literal["random", "fixed"] = Field(
        "random",
        description="Order of the four jitter ops: 'random' per image (torchvision's ColorJitter, as the "
        "authors' code); 'fixed': brightness, contrast, saturation, hue.",
    )
    grayscale_p: float = Field(0.2, ge=0, le=1, description="Grayscale probability.")
    blur_p: float = Field(
        0.5, ge=0, le=1, description="Gaussian blur probability (synclr: synclr.global_blur_p, local_blur_p)."
    )
    blur_sigma: tuple[float, float] = Field((0.1, 2.0), description="Gaussian blur sigma range.")
    solarize_p: float = Field(
        0.0, ge=0, le=1, description="Probability of solarizing (inverting every value >= 0.5) after the blur."
    )
    downsample_p: float = Field(
        0.05, ge=0, le=1,
        description="Probability of first resizing an image down to one of downsample_sizes and back "
        "(the authors' low-resolution augmentation); sizes not below the image are skipped.",
    )
    downsample_sizes: list[int] = Field([64, 128], description="Sizes (px) the downsampling draws from.")


class TrainConfig(_Section):
    objective: str = Field(
        "stablerep",
        description="Training objective (training/objectives/): 'stablerep': multi-positive loss over m "
        "images per caption; 'simclr': two views of one image; 'stablerep_plus': stablerep plus a "
        "CLIP-style image-text loss; 'synclr': an EMA teacher, multi-crop and iBOT's masked-patch loss (synclr.*).",
    )
    batch_size: int = Field(
        8256, gt=0, description="Global images per step (all workers); a multiple of m x num_workers."
    )
    steps: int = Field(1000, gt=0, description="Optimiser steps in the run.")
    base_lr: float = Field(
        2e-4, gt=0, description="Learning rate per 256 images (train.lr_scaling turns it into the peak lr)."
    )
    lr_scaling: Literal["authors", "linear"] = Field(
        "authors",
        description="Peak lr from base_lr. 'authors': base_lr x batch_size / 256 / 2, as StableRep's released "
        "code (its crop-count factor num_crops / 2 with one crop per image); 'linear': base_lr x batch_size / 256.",
    )
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (not on norms or biases).")
    weight_decay_end: float | None = Field(
        None, ge=0,
        description="If set, the weight decay follows a cosine from weight_decay at step 0 to this value at "
        "train.steps (DINO/iBOT/SynCLR: 0.04 -> 0.2); None: constant.",
    )
    betas: tuple[float, float] = Field((0.9, 0.98), description="AdamW betas.")
    warmup_steps: int = Field(100, ge=0, description="Linear warm-up steps before the cosine decay.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final lr as a fraction of the peak lr.")
    temperature: float = Field(0.1, gt=0, description="Contrastive temperature tau.")
    grad_clip: float | None = Field(None, gt=0, description="Clip the global grad norm (None: off).")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="Autocast dtype; 'auto' is bf16 on GPU, fp32 on CPU."
    )
    num_workers: int = Field(2, gt=0, description="DDP workers (Ray Train).")
    use_gpu: bool = Field(False, description="Train workers on GPUs (train.gpus_per_worker each).")
    gpus_per_worker: float = Field(
        1.0, gt=0, le=1,
        description="GPU share of a train worker when train.use_gpu: 1 is a GPU of its own; a fraction "
        "(e.g. 0.5, with generator.num_gpus_per_actor 0.5) lets a generator actor share its GPU, as on a "
        "one-GPU machine. Two DDP ranks cannot share a GPU (NCCL refuses), so a fraction needs "
        "train.num_workers=1.",
    )
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
    data: str | list[str] = Field(
        "",
        description="Labelled evaluation images: ImageFolder dir, parquet (image bytes + label), or "
        "'simulator:<attribute>' for the simulator's held-out set. Empty: no online evaluation. "
        "'TRAIN:TEST' splits into a memory bank and a query set. A list of such specs (e.g. "
        "[simulator:color, simulator:shape]) scores each set: the first is eval/knn_top1, and every "
        "set is also eval/knn_top1/<name> (its simulator attribute, else its directory or file name).",
    )
    every: int = Field(0, ge=0, description="Steps between online kNN evaluations (0: only at the end).")
    knn_k: int = Field(20, gt=0, description="Neighbours in the kNN classifier.")
    knn_temperature: float = Field(0.07, gt=0, description="Temperature of the kNN vote weights.")
    batch_size: int = Field(
        256, gt=0, description="Images per feature-extraction batch (and per decode block of the stream)."
    )
    max_images: int = Field(
        0, ge=0, description="Cap on the images of each evaluation set, a class-balanced subset (0: all)."
    )
    online_max_images: int = Field(
        10000,
        ge=0,
        description="Cap on the online kNN's memory bank and query set, each (class-balanced), of every "
        "eval.data set: rank 0 holds them as uint8 at model.image_size, 2 x cap x image_size^2 x 3 bytes "
        "per set (3 GB at 10000 and 224 px). 0: no cap, for sets known to be small.",
    )

    @field_validator("data", mode="before")
    @classmethod
    def _one_spec_or_a_list(cls, value):
        if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            return value
        raise ValueError("expected one spec or a list of specs, e.g. simulator:shape or [simulator:color, "
                         "simulator:shape]")

    @property
    def data_specs(self) -> list[str]:
        """``data`` as a list: none when empty, else one entry per evaluation set."""
        if isinstance(self.data, str):
            return [self.data] if self.data else []
        return list(self.data)


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
