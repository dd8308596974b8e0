"""Build a small, randomly initialised Stable Diffusion pipeline and save it with ``save_pretrained``.

Offline machines (CI, laptops, air-gapped clusters) cannot download a checkpoint, but the project must
still exercise the very ``from_pretrained(dir)`` path a real checkpoint takes. This builds the same
component classes as SD 1.5 (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer) at a
toy size. Its images do not depend on the caption in any useful way: use the simulator backend to see
learning offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def write_tiny_clip_tokenizer(directory: str | Path, model_max_length: int = 77) -> Path:
    """A byte-level CLIP BPE tokenizer with no merges (every byte is a token): 514 tokens."""
    from transformers import CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=model_max_length
    )
    tokenizer.save_pretrained(directory)
    return directory


def make_tiny_pipeline(directory: str | Path, seed: int = 0, sample_size: int = 32) -> Path:
    """Save a tiny SD-architecture text-to-image pipeline to ``directory``; returns the directory.

    ``sample_size`` is the latent size: images are ``8 * sample_size`` pixels by default.
    """
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    directory = Path(directory)
    torch.manual_seed(seed)
    blocks = {"block_out_channels": (32, 64), "norm_num_groups": 32}  # two small levels, both models
    unet = UNet2DConditionModel(
        **blocks, sample_size=sample_size, layers_per_block=1, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8,
    )
    vae = AutoencoderKL(
        **blocks, sample_size=sample_size * 8, in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    tokenizer_dir = write_tiny_clip_tokenizer(directory / "_tokenizer_build")
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1,
    )
    pipeline = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.save_pretrained(directory)
    for leftover in sorted((directory / "_tokenizer_build").iterdir()):
        leftover.unlink()
    (directory / "_tokenizer_build").rmdir()
    return directory
