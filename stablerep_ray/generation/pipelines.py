"""What a diffusers text-to-image pipeline must hold, and the settings some models need.

Read twice: from the ``model_index.json`` of a local directory or Hub repository before Ray starts
(``check_pipeline``), and from the loaded pipeline in each generator actor (``model_settings``, ``check_scheduler``,
``choose_guidance``), so UNet and transformer denoisers with one or several text encoders go through
one code path.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

from ..config import ConfigError, GeneratorConfig

# Parts every text-to-image pipeline declares; a name matches its numbered twins (text_encoder_2).
REQUIRED = {
    "a unet or transformer denoiser": ("unet", "transformer"),
    "a vae": ("vae",),
    "a text encoder": ("text_encoder",),
    "a scheduler": ("scheduler",),
}
# Pipeline classes that need an input image besides the caption.
IMAGE_CONDITIONED = ("Img2Img", "Inpaint", "Upscale", "Depth2Img", "InstructPix2Pix", "ControlNet")

# Few-step distilled models share their base model's pipeline class, so they are known by id: a
# lower-case fragment of the hub id or directory name -> (steps, guidance scale) from the model card.
FEW_STEP_MODELS = {
    "sdxl-turbo": (1, 0.0),
    "sd-turbo": (1, 0.0),
    "stable-diffusion-3.5-large-turbo": (4, 0.0),
    "flux.1-schnell": (4, 0.0),
    "pixart-lcm": (4, 0.0),
    "z-image-turbo": (9, 0.0),  # 9 scheduler steps are 8 denoiser passes
}
# Few-step pipeline classes: their own ``__call__`` defaults hold their steps and guidance.
FEW_STEP_CLASSES = ("LatentConsistencyModelPipeline", "SanaSprintPipeline")
# Pipeline classes whose config flags step-distilled weights (``is_distilled``; the base model of the
# same class is not) -> (steps, guidance scale) from the model card.
FEW_STEP_WHEN_DISTILLED = {"Flux2KleinPipeline": (4, 1.0)}


def check_pipeline(cfg: GeneratorConfig) -> None:
    """Fail fast on a model that is missing, is not a complete text-to-image pipeline, or does not
    take the config's settings: a local directory, or a Hub id by its config files (``hub_configs``)."""
    model = cfg.model
    path = Path(model).expanduser()
    looks_local = path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1
    if not looks_local:
        from ..hub import PIPELINE, hub_configs

        snapshot = hub_configs(model, PIPELINE)
        if snapshot is not None:
            check_pipeline_files(cfg, snapshot, complete=False)
        return
    if not path.is_dir():
        raise ConfigError(
            f"generator.model: {model} does not exist; give a diffusers pipeline directory or hub id "
            f"(or build one offline with `stablerep-ray make-tiny-pipeline {model}`)"
        )
    if not (path / "model_index.json").is_file():
        raise ConfigError(
            f"generator.model: {model} has no model_index.json, so it is not a diffusers pipeline "
            f"directory; point it at a pipeline saved with save_pretrained"
        )
    check_pipeline_files(cfg, path, complete=True)


def check_pipeline_files(cfg: GeneratorConfig, path: Path, complete: bool) -> None:
    """The checks on a pipeline's model_index.json and configs in ``path``; ``complete``: the folder
    holds the whole pipeline (a local directory, not the configs fetched from the Hub)."""
    model = cfg.model
    components = read_json_object(path / "model_index.json")
    class_name = str(components.get("_class_name"))
    check_text_to_image(model, class_name, [c for c, v in components.items() if is_component(c, v)])
    absent = [c for c, v in components.items() if is_component(c, v) and not (path / c).is_dir()]
    if complete and absent:
        raise ConfigError(
            f"generator.model: {model} lists {', '.join(absent)} in model_index.json but has no "
            f"{'/, '.join(absent)}/ folder; the download or copy is incomplete, fetch the whole pipeline"
        )
    if cfg.safety_checker and not is_component("safety_checker", components.get("safety_checker")):
        raise no_safety_checker(model)
    check_pipeline_class(model, components, path)
    scheduler = path / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():
        config = read_json_object(scheduler)
        wanted = model_settings(cfg, class_name, config, pipeline_config=components).get("scheduler", cfg.scheduler)
        check_scheduler(wanted, config, str(config.get("_class_name")), class_name)


def no_safety_checker(model: str) -> ConfigError:
    return ConfigError(
        f"generator.safety_checker: {model} has no safety checker; set it to false or use a pipeline that ships one"
    )


def check_pipeline_class(model: str, index: dict, path: Path) -> None:
    """Refuse a pipeline class this diffusers lacks, or one that cannot take the guidance scale."""
    import diffusers

    class_name = index.get("_class_name")
    if not isinstance(class_name, str):
        return  # [module, class]: a pipeline shipped with its own code, checked when the actor loads it
    try:
        pipeline_class = getattr(diffusers, class_name, None)
    except (ImportError, RuntimeError) as err:  # present, but an optional dependency is missing
        raise ConfigError(f"generator.model: {model} needs diffusers' {class_name}, which does not import "
                          f"here ({str(err).splitlines()[0]}); install what it names") from None
    if pipeline_class is None:
        saved = f" (saved with diffusers {index['_diffusers_version']})" if "_diffusers_version" in index else ""
        raise ConfigError(
            f"generator.model: {model} holds a {class_name}{saved}, which diffusers {diffusers.__version__} "
            f"installed here does not have; upgrade diffusers (`uv add -U diffusers`) or use another pipeline"
        )
    denoiser_config = next((path / name / "config.json" for name in ("transformer", "unet")
                            if (path / name / "config.json").is_file()), None)
    embeds_guidance = bool(denoiser_config and read_json_object(denoiser_config).get("guidance_embeds"))
    choose_guidance(model, class_name, inspect.signature(pipeline_class.__call__).parameters, embeds_guidance)


def choose_guidance(model: str, pipeline_class: str, call_parameters, embeds_guidance: bool) -> str:
    """The ``__call__`` argument that takes the config's guidance scale. Most pipelines take
    ``guidance_scale``. Where a pipeline also has ``true_cfg_scale`` and its denoiser embeds no
    guidance (Qwen-Image, FLUX.1-schnell), ``guidance_scale`` is meant for guidance-distilled weights
    and ignored, and classifier-free guidance is ``true_cfg_scale``, on only with a negative prompt."""
    if "true_cfg_scale" in call_parameters and not (embeds_guidance and "guidance_scale" in call_parameters):
        return "true_cfg_scale"
    if "guidance_scale" in call_parameters:
        return "guidance_scale"
    raise ConfigError(
        f"generator.model: {model} holds a {pipeline_class}, which takes neither guidance_scale nor "
        f"true_cfg_scale, so generator.guidance_scale cannot be applied; use a pipeline that takes one"
    )


def check_text_to_image(model: str, class_name: str, components: list[str]) -> None:
    """Refuse a pipeline that edits an input image or lacks a part of a text-to-image pipeline."""
    if any(tag in class_name for tag in IMAGE_CONDITIONED):
        raise ConfigError(
            f"generator.model: {model} holds a {class_name}, which needs an input image; a "
            f"text-to-image pipeline is needed (e.g. the same model's text-to-image repository)"
        )
    missing = [what for what, names in REQUIRED.items() if not any(c.startswith(names) for c in components)]
    if missing:
        raise ConfigError(
            f"generator.model: {model} holds a {class_name} without {', '.join(missing)}; a "
            f"text-to-image pipeline is needed"
        )


def read_json_object(file: Path) -> dict:
    """A pipeline's JSON file (model_index.json, a component config) as a dict, or a ConfigError."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise ConfigError(
            f"generator.model: {file} is not valid JSON ({err}); the download or copy is incomplete, "
            f"fetch the pipeline again"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"generator.model: {file} is not a JSON object; fetch the pipeline again")
    return data


def is_component(name: str, value) -> bool:
    """A model_index.json entry that save_pretrained wrote to its own subfolder (not a null slot)."""
    return not name.startswith("_") and isinstance(value, list) and any(v is not None for v in value)


def samples_ddpm_noise(scheduler_config: dict) -> bool:
    """Whether a scheduler samples a DDPM noise schedule (beta schedule, epsilon / v / sample
    prediction): only then can one of ``generator.scheduler``'s samplers replace it. Flow-matching
    (SD3, Flux, Sana) and trigflow (Sana Sprint) models need their own."""
    return (
        "beta_schedule" in scheduler_config
        and not scheduler_config.get("use_flow_sigmas")
        and scheduler_config.get("prediction_type", "epsilon") in ("epsilon", "v_prediction", "sample")
    )


def model_settings(cfg: GeneratorConfig, pipeline_class: str, scheduler_config: dict,
                   native_resolution: int | None = None, call_defaults: dict | None = None,
                   pipeline_config: dict | None = None) -> dict:
    """The settings this model needs in place of schema defaults the config left untouched.

    Few-step models get their steps, guidance and own scheduler; models whose scheduler is not a
    DDPM sampler (flow matching) keep it; every model gets its native resolution. Empty with
    ``generator.model_defaults: false``. ``call_defaults`` (the pipeline's ``__call__`` defaults) and
    ``native_resolution`` are known only once the pipeline is loaded; ``pipeline_config`` is
    model_index.json's or the loaded pipeline's config.
    """
    if not cfg.model_defaults:
        return {}
    wanted: dict = {}
    few = next((v for k, v in FEW_STEP_MODELS.items() if k in cfg.model.lower()), None)
    if few is None and pipeline_class in FEW_STEP_CLASSES and call_defaults:
        few = (call_defaults["num_inference_steps"], call_defaults["guidance_scale"])
    if few is None and (pipeline_config or {}).get("is_distilled"):
        few = FEW_STEP_WHEN_DISTILLED.get(pipeline_class)
    if few or pipeline_class in FEW_STEP_CLASSES or not samples_ddpm_noise(scheduler_config):
        wanted["scheduler"] = "pipeline"
    if few:
        wanted.update(steps=few[0], guidance_scale=few[1])
    if native_resolution:
        wanted["resolution"] = native_resolution
    fields = GeneratorConfig.model_fields
    return {k: v for k, v in wanted.items() if getattr(cfg, k) == fields[k].default != v}


def check_scheduler(wanted: str, scheduler_config: dict, scheduler_class: str, pipeline_class: str) -> None:
    """Refuse replacing a flow-matching (or other non-DDPM) scheduler with a DDPM sampler."""
    if wanted != "pipeline" and not samples_ddpm_noise(scheduler_config):
        raise ConfigError(
            f"generator.scheduler: {pipeline_class} samples with {scheduler_class}, not a DDPM noise "
            f"schedule, so {wanted!r} cannot replace it; set generator.scheduler=pipeline"
        )
