"""Config sections that belong to one objective (read only when ``train.objective`` selects it)."""

from __future__ import annotations

from pydantic import Field

from .sections import _Section


class SynCLRConfig(_Section):
    """SynCLR (arXiv 2312.17742): an EMA teacher, multi-crop and iBOT's masked-patch loss on top of
    the multi-positive loss. Defaults are the paper's ViT-B/16 recipe; ``train.temperature`` is the
    contrastive temperature (SynCLR: 0.08)."""

    global_crops: int = Field(1, gt=0, description="Global crops per drawn image (model.image_size px).")
    local_crops: int = Field(4, ge=0, description="Local crops per drawn image (local_size px).")
    global_crop_scale: tuple[float, float] = Field(
        (0.32, 1.0),
        description="Area range of global crops (augment.* applies to both kinds, but for blur and solarize).",
    )
    local_crop_scale: tuple[float, float] = Field((0.08, 0.32), description="Area range of local crops.")
    local_size: int = Field(
        96, gt=0, description="Local crop side in pixels; a multiple of the ViT patch size."
    )
    global_blur_p: tuple[float, float] = Field(
        (1.0, 0.1),
        description="Blur probability of global crops in DINO's two recipes (augment.blur_p is not used "
        "by synclr): an image's first global crop takes either recipe at random, its next the other.",
    )
    global_solarize_p: tuple[float, float] = Field(
        (0.0, 0.2), description="Solarize probability of global crops in the same two recipes (local crops: never)."
    )
    local_blur_p: float = Field(0.5, ge=0, le=1, description="Blur probability of local crops.")
    local_matches_own_image: bool = Field(
        True,
        description="A local crop's positives include its own image's teacher global crop, as the "
        "authors' command runs it; false leaves that crop out, as for global crops (their "
        "--avoid_local_global_same).",
    )
    teacher_momentum: tuple[float, float] = Field(
        (0.994, 1.0),
        description="EMA momentum of the teacher: a cosine from the first value at step 0 to the second "
        "at train.steps.",
    )
    predictor_hidden_dim: int = Field(
        4096, gt=0, description="Hidden width of the student-only predictor MLP after the projection."
    )
    contrastive_weight: float = Field(1.0, ge=0, description="Weight of the multi-positive term.")
    ibot_weight: float = Field(1.0, ge=0, description="Weight of the masked-patch (iBOT) term (0: off).")
    mask_probability: float = Field(
        0.5, ge=0, le=1,
        description="Share of global crops with patches masked for the student (a rank's count rounded at random).",
    )
    mask_ratio: float = Field(0.5, gt=0, lt=1, description="Fraction of a masked crop's patches masked.")
    prototypes: int = Field(
        8192, gt=1, description="Prototypes of the iBOT head (the authors' PyTorch command: 8192; the paper: 65536)."
    )
    ibot_hidden_dim: int = Field(2048, gt=0, description="Hidden width of the iBOT head's MLP.")
    ibot_bottleneck_dim: int = Field(256, gt=0, description="Bottleneck before the iBOT prototypes.")
    student_temperature: float = Field(0.1, gt=0, description="Temperature of the student's patch logits.")
    teacher_temperature: tuple[float, float] = Field(
        (0.04, 0.07),
        description="Teacher patch-logit temperature: linear from the first to the second value over "
        "teacher_temperature_warmup_steps, then constant.",
    )
    teacher_temperature_warmup_steps: int = Field(
        4000, ge=0, description="Steps of the teacher-temperature warm-up (paper: ~4k)."
    )
    sinkhorn_iterations: int = Field(3, gt=0, description="Sinkhorn-Knopp iterations centring teacher targets.")
    eval_student: bool = Field(
        True,
        description="Online evaluation also probes the student (eval/student/*); the teacher is what "
        "eval/* and checkpoints' default weights report, as the authors do.",
    )
