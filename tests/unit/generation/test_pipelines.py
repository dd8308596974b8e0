"""Pipeline directories judged by their model_index.json before Ray starts, and the per-model settings."""

import json

import pytest

from stablerep_ray.config import ConfigError, GeneratorConfig
from stablerep_ray.generation.pipelines import check_pipeline, model_settings, samples_ddpm_noise

SD = {"_class_name": "StableDiffusionPipeline", "safety_checker": [None, None],
      **{c: ["diffusers", "X"] for c in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")}}
SD3 = {"_class_name": "StableDiffusion3Pipeline", "image_encoder": [None, None],
       **{c: ["diffusers", "X"] for c in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer",
                                           "tokenizer_2", "text_encoder_3", "tokenizer_3", "scheduler")}}
FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "num_train_timesteps": 1000}
DDPM = {"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}


def pipeline(root, index: dict, scheduler: dict | None = None, without: tuple = ()) -> str:
    """A pipeline directory: model_index.json plus a folder for every non-null component but ``without``."""
    root.mkdir()
    (root / "model_index.json").write_text(json.dumps(index))
    for name, value in index.items():
        if isinstance(value, list) and value[0] is not None and name not in without:
            (root / name).mkdir()
    if scheduler is not None and "scheduler" not in without:
        (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    return str(root)


def refused(model: str, **settings) -> str:
    with pytest.raises(ConfigError) as err:
        check_pipeline(GeneratorConfig(model=model, **settings))
    return str(err.value)


@pytest.mark.parametrize("index", [SD, SD3], ids=["unet", "transformer"])
def test_complete_pipelines_pass(tmp_path, index):
    check_pipeline(GeneratorConfig(model=pipeline(tmp_path / "p", index, DDPM if index is SD else FLOW)))


def test_null_slot_needs_no_folder(tmp_path):
    """SD3 saved without its T5 encoder: model_index.json keeps the slot as null."""
    index = {**SD3, "text_encoder_3": [None, None], "tokenizer_3": [None, None]}
    check_pipeline(GeneratorConfig(model=pipeline(tmp_path / "p", index, FLOW)))


@pytest.mark.parametrize("missing", ["text_encoder_2", "tokenizer_3", "transformer"])
def test_component_named_in_the_index_must_have_its_folder(tmp_path, missing):
    message = refused(pipeline(tmp_path / "p", SD3, FLOW, without=(missing,)))
    assert f"lists {missing} in model_index.json but has no {missing}/ folder" in message
    assert message.startswith("generator.model:") and "fetch the whole pipeline" in message


@pytest.mark.parametrize(("index", "expected"), [
    ({"_class_name": "DiTPipeline", "transformer": ["d", "X"], "vae": ["d", "X"], "scheduler": ["d", "X"]},
     "DiTPipeline without a text encoder"),
    ({"_class_name": "StableDiffusionXLImg2ImgPipeline", **{c: ["d", "X"] for c in SD if not c.startswith("_")}},
     "StableDiffusionXLImg2ImgPipeline, which needs an input image"),
    ({"_class_name": "StableDiffusionInpaintPipeline", **{c: ["d", "X"] for c in SD if not c.startswith("_")}},
     "needs an input image"),
    ({"_class_name": "X", "unet": [None, None], "vae": ["d", "X"], "text_encoder": ["d", "X"],
      "scheduler": ["d", "X"]}, "without a unet or transformer denoiser"),
])
def test_not_text_to_image_is_refused(tmp_path, index, expected):
    message = refused(pipeline(tmp_path / "p", index))
    assert expected in message and "text-to-image pipeline is needed" in message


def test_safety_checker_asked_of_a_pipeline_without_one_is_refused(tmp_path):
    model = pipeline(tmp_path / "p", SD, DDPM)  # its safety_checker slot is null, as save_pretrained writes it
    assert refused(model, safety_checker=True) == (
        f"generator.safety_checker: {model} has no safety checker; set it to false or use a pipeline that ships one")
    check_pipeline(GeneratorConfig(model=pipeline(tmp_path / "q", {**SD, "safety_checker": ["stable_diffusion", "X"]},
                                                  DDPM), safety_checker=True))


def test_pipeline_class_must_exist_in_the_installed_diffusers(tmp_path):
    import diffusers

    message = refused(pipeline(tmp_path / "p", {**SD, "_class_name": "StableDiffusion9Pipeline",
                                                "_diffusers_version": "9.1.0"}, DDPM))
    assert message == (f"generator.model: {tmp_path / 'p'} holds a StableDiffusion9Pipeline (saved with diffusers "
                       f"9.1.0), which diffusers {diffusers.__version__} installed here does not have; upgrade "
                       f"diffusers (`uv add -U diffusers`) or use another pipeline")


def test_pipeline_that_takes_no_guidance_scale_is_refused_before_ray_starts(tmp_path):
    """HunyuanImage guides by a distilled embedding of its own (``distilled_guidance_scale``)."""
    index = {**SD3, "_class_name": "HunyuanImagePipeline"}
    message = refused(pipeline(tmp_path / "p", index, FLOW))
    assert message.startswith("generator.model:") and "takes neither guidance_scale nor true_cfg_scale" in message


def test_flow_matching_scheduler_cannot_be_replaced(tmp_path):
    model = pipeline(tmp_path / "p", SD3, FLOW)
    message = refused(model, scheduler="euler")
    assert message.startswith("generator.scheduler:") and "FlowMatchEulerDiscreteScheduler" in message
    assert "set generator.scheduler=pipeline" in message
    # the default sampler becomes 'pipeline' by the model defaults, unless they are off
    check_pipeline(GeneratorConfig(model=model))
    assert "generator.scheduler" in refused(model, model_defaults=False)
    check_pipeline(GeneratorConfig(model=model, scheduler="pipeline", model_defaults=False))


def test_scheduler_kinds():
    assert samples_ddpm_noise(DDPM)
    assert not samples_ddpm_noise(FLOW)
    assert not samples_ddpm_noise({**DDPM, "use_flow_sigmas": True, "prediction_type": "flow_prediction"})  # Sana
    assert not samples_ddpm_noise({"_class_name": "SCMScheduler", "prediction_type": "trigflow"})


def test_model_settings_replace_only_untouched_defaults():
    turbo = GeneratorConfig(model="stabilityai/sdxl-turbo")
    assert model_settings(turbo, "StableDiffusionXLPipeline", DDPM, native_resolution=512) == {
        "steps": 1, "guidance_scale": 0.0, "scheduler": "pipeline"}  # 512 is already the default
    mine = GeneratorConfig(model="/models/sdxl-turbo", steps=3, guidance_scale=1.5, resolution=768)
    assert model_settings(mine, "StableDiffusionXLPipeline", DDPM, native_resolution=512) == {"scheduler": "pipeline"}
    base = GeneratorConfig(model="stabilityai/stable-diffusion-xl-base-1.0")
    assert model_settings(base, "StableDiffusionXLPipeline", DDPM, native_resolution=1024) == {"resolution": 1024}
    assert model_settings(GeneratorConfig(model="x/sd3"), "StableDiffusion3Pipeline", FLOW) == {"scheduler": "pipeline"}
    lcm = model_settings(GeneratorConfig(model="a/b"), "LatentConsistencyModelPipeline", DDPM,
                         call_defaults={"num_inference_steps": 4, "guidance_scale": 8.5})
    assert lcm == {"steps": 4, "guidance_scale": 8.5, "scheduler": "pipeline"}
    zimage = model_settings(GeneratorConfig(model="Tongyi-MAI/Z-Image-Turbo"), "ZImagePipeline", FLOW)
    assert zimage == {"steps": 9, "guidance_scale": 0.0, "scheduler": "pipeline"}
    klein = GeneratorConfig(model="black-forest-labs/FLUX.2-klein-4B")
    assert model_settings(klein, "Flux2KleinPipeline", FLOW, pipeline_config={"is_distilled": True}) == {
        "steps": 4, "guidance_scale": 1.0, "scheduler": "pipeline"}
    klein_base = GeneratorConfig(model="black-forest-labs/FLUX.2-klein-base-4B")  # the same class, not distilled
    assert model_settings(klein_base, "Flux2KleinPipeline", FLOW, pipeline_config={"is_distilled": False}) == {
        "scheduler": "pipeline"}
    off = GeneratorConfig(model="stabilityai/sdxl-turbo", model_defaults=False)
    assert model_settings(off, "StableDiffusionXLPipeline", DDPM, native_resolution=1024) == {}
