"""Out of GPU memory: the work that ran out and the setting to change, in one line (stablerep_ray/memory.py).

Each site is exercised through its real code (the generator's diffusers call, feature extraction, the
training step's config), with torch's own exception raised where CUDA would raise it: a forward hook
on the module that would have allocated. The messages are torch 2.x's, as its allocator writes them.
"""

import numpy as np
import pytest
import torch
from repo import QUICKSTART

from stablerep_ray.config import ConfigError, GeneratorConfig, load_config
from stablerep_ray.memory import NamesSetting, loading_model, memory_state

# torch's allocator message on a card shared with two other processes (NVML present), and without NVML
# on a full card, as torch 2.1 spelled it.
SHARED_CARD = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.11 GiB of which 1.06 GiB "
    "is free. Process 4012 has 40.10 GiB memory in use. Process 4013 has 17.90 GiB memory in use. Including "
    "non-PyTorch memory, this process has 20.02 GiB memory in use. Of the allocated memory 18.20 GiB is "
    "allocated by PyTorch, and 1.10 GiB is reserved by PyTorch but unallocated. If reserved but unallocated "
    "memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation."
)
FULL_CARD_NO_NVML = (
    "CUDA out of memory. Tried to allocate 27.12 GiB. GPU 0 has a total capacty of 11.99 GiB of which 0 bytes "
    "is free. Of the allocated memory 16.16 GiB is allocated by PyTorch, and 144.59 MiB is reserved by PyTorch "
    "but unallocated."
)


def out_of_memory(message: str = SHARED_CARD):
    """A forward hook that raises what CUDA's allocator raises."""
    def hook(*_):
        raise torch.OutOfMemoryError(message)
    return hook


def test_torch_message_in_a_few_words():
    assert memory_state(SHARED_CARD) == "asked for 2.00 GiB, 1.06 GiB free of 79.11 GiB, 2 other processes on the card"
    assert memory_state(FULL_CARD_NO_NVML) == "asked for 27.12 GiB, 0 bytes free of 11.99 GiB"
    assert memory_state("CUDA out of memory.") == ""


def test_out_of_memory_becomes_one_line_with_torchs_error_kept_behind_it():
    with pytest.raises(ConfigError) as refused, NamesSetting("a.key", "the work", "fix one", "fix two", "fix three"):
        raise torch.OutOfMemoryError(FULL_CARD_NO_NVML)
    assert str(refused.value) == ("a.key: the work ran out of GPU memory (asked for 27.12 GiB, 0 bytes free of "
                                  "11.99 GiB); fix one, fix two or fix three")
    assert isinstance(refused.value.__cause__, torch.OutOfMemoryError)  # the worker's log keeps torch's summary
    assert ConfigError.raised_in(refused.value) is refused.value  # what ends a Train run or a sweep's trial


def test_one_instance_serves_every_step_of_a_loop():
    """The train loop builds it once and enters it every step."""
    out_of_memory = NamesSetting("a.key", "the work", "fix")
    with out_of_memory:
        pass
    for _ in range(2):
        with pytest.raises(ConfigError, match=r"^a\.key: the work ran out of GPU memory"), out_of_memory:
            raise torch.OutOfMemoryError(SHARED_CARD)


def test_other_errors_pass_unchanged():
    for error in (RuntimeError("CUDA error: an illegal memory access was encountered"), ConfigError("x: y")):
        with pytest.raises(type(error)) as raised, NamesSetting("a.key", "work", "fix"):
            raise error
        assert raised.value is error


def test_training_step_names_the_batch_per_worker():
    config = load_config(QUICKSTART, ["train.precision=fp32"])
    inputs = config.captions_per_worker_step * config.group_size
    from stablerep_ray.training.step import step_memory

    with pytest.raises(ConfigError) as refused, step_memory(config):
        raise torch.OutOfMemoryError(SHARED_CARD)
    assert str(refused.value) == (
        f"train.batch_size: a training step on {inputs} inputs per worker ({config.model.name} at "
        f"{config.model.image_size} px) ran out of GPU memory (asked for 2.00 GiB, 1.06 GiB free of 79.11 GiB, 2 "
        f"other processes on the card); spread it over more workers (train.num_workers), recompute activations "
        f"in the backward pass (model.grad_checkpointing: true), train in bf16 (train.precision: auto) or lower "
        f"train.batch_size (a different recipe)")


def test_loading_a_model_names_the_actors_share_of_the_card():
    with pytest.raises(ConfigError) as refused, loading_model("generator", "m", "fp32"):
        raise torch.OutOfMemoryError(SHARED_CARD)
    assert str(refused.value).startswith("generator.num_gpus_per_actor: loading m ran out of GPU memory (")
    assert str(refused.value).endswith("; give each actor a larger share of a GPU (generator.num_gpus_per_actor) or "
                                       "load it in half precision (generator.dtype: auto)")


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize(("captions", "expected"), [
    (2, "generator.captions_per_call: one call of 2 captions x 2 images at 64 px ran out of GPU memory (asked for "
        "27.12 GiB, 0 bytes free of 11.99 GiB); lower generator.captions_per_call or decode one image at a time "
        "(generator.vae_slicing: true)"),
    (1, "generator.images_per_caption: one call of 1 caption x 2 images at 64 px ran out of GPU memory (asked for "
        "27.12 GiB, 0 bytes free of 11.99 GiB); lower generator.images_per_caption, decode one image at a time "
        "(generator.vae_slicing: true) or give each actor a larger share of a GPU (generator.num_gpus_per_actor)"),
], ids=["several-captions", "one-caption"])
def test_generator_call_names_what_sized_it(tmp_path, captions, expected):
    """The classic case: the VAE decoding the whole call's latents at once."""
    from stablerep_ray.generation.diffusion import DiffusersGenerator
    from stablerep_ray.tools.tiny_pipeline import make_tiny_pipeline

    model = make_tiny_pipeline(tmp_path / "sd15")
    generator = DiffusersGenerator(GeneratorConfig(model=str(model), steps=1, resolution=64, output_size=16,
                                                   images_per_caption=2))
    generator.pipe.vae.decoder.register_forward_pre_hook(out_of_memory(FULL_CARD_NO_NVML))
    batch = {"caption_id": np.arange(captions), "position": np.arange(captions),
             "caption": np.array(["a red cube"] * captions)}
    with pytest.raises(ConfigError) as refused:
        generator(batch)
    assert str(refused.value) == expected


def test_feature_extraction_names_the_eval_batch():
    from stablerep_ray.evaluation import extract_features
    from stablerep_ray.models import build_model

    config = load_config(QUICKSTART)
    model = build_model(config)
    model.encoder.register_forward_pre_hook(out_of_memory())
    images = np.zeros((8, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(ConfigError, match=r"^eval\.batch_size: feature extraction of 4 images at \d+ px ran out of "
                                          r"GPU memory \(.*\); lower eval\.batch_size \(eval's --batch-size\)$"):
        extract_features(model, images, config.model.image_size, batch_size=4)
    assert model.training  # its mode restored on the way out
