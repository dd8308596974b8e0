"""Build small, randomly initialised text-to-image pipelines and save them with ``save_pretrained``.

Offline machines (CI, laptops, air-gapped clusters) cannot download a checkpoint, but the project must
still exercise the very ``from_pretrained(dir)`` path a real checkpoint takes. Each family here has
the component classes of its real model at a toy size:

- ``sd15``: SD 1.5 (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer);
- ``sdxl``: SDXL (two CLIP text encoders, the second with a projection; a UNet with SDXL's size and
  crop embeddings);
- ``pixart``: PixArt-alpha (PixArtTransformer2DModel, a T5 encoder and tokenizer);
- ``sd3``: SD3 (SD3Transformer2DModel, two CLIP encoders and a T5, a 16-channel VAE, flow matching);
- ``flux``: FLUX.1-dev (FluxTransformer2DModel with guidance embedding, a CLIP and a T5 encoder,
  packed 16-channel latents, flow matching with resolution-dependent shift);
- ``sana``: Sana (SanaTransformer2DModel, a Gemma 2 decoder as text encoder, the DC-AE autoencoder,
  flow sampling through DPM-Solver);
- ``qwenimage``: Qwen-Image (QwenImageTransformer2DModel, a Qwen2.5-VL model as text encoder, its
  causal-conv VAE, flow matching; classifier-free guidance through ``true_cfg_scale``);
- ``zimage``: Z-Image (ZImageTransformer2DModel, a single-stream DiT over a Qwen3 model's chat-templated
  states, a 16-channel VAE, flow matching);
- ``flux2klein``: FLUX.2 [klein], step-distilled (Flux2Transformer2DModel without a guidance embedding,
  three layers of a Qwen3 causal LM stacked as text states, FLUX.2's batch-normalised VAE, flow matching).

Tokenizers are built from code (byte-level CLIP and Qwen BPE, character T5 unigram and Gemma BPE), so
nothing is downloaded. The images do not depend on the caption in any useful way: use the simulator
backend to see learning offline.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

FAMILIES = ("sd15", "sdxl", "pixart", "sd3", "flux", "sana", "qwenimage", "zimage", "flux2klein")


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


def tiny_t5_tokenizer(model_max_length: int = 512):
    """A T5 unigram tokenizer over printable ASCII characters (with and without the word-start mark),
    built in memory: T5's special tokens and framing, no sentencepiece model file."""
    from transformers import T5Tokenizer

    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in chars] + [("\u2581" + c, -3.5) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def tiny_gemma_tokenizer():
    """A Gemma BPE tokenizer with no merges over printable ASCII characters and the word-start mark."""
    from transformers import GemmaTokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    symbols = specials + ["\u2581"] + [chr(c) for c in range(ord("!"), ord("~") + 1)]
    return GemmaTokenizer(vocab={s: i for i, s in enumerate(symbols)}, merges=[])


def make_tiny_pipeline(directory: str | Path, seed: int = 0, sample_size: int = 32, family: str = "sd15") -> Path:
    """Save a tiny ``family`` text-to-image pipeline to ``directory``; returns the directory.

    ``sample_size`` is the denoiser's nominal latent size; with the two-level VAE (scale factor 2)
    the pipeline's native resolution is ``2 * sample_size`` pixels (64 by default). Flux, FLUX.2 and
    Qwen-Image ignore it: their pipelines fix the latent size at 128, so their native resolution is 256 pixels.
    Z-Image's pipeline fixes 1024 pixels in its ``__call__``.
    """
    builders = {"sd15": _sd15, "sdxl": _sdxl, "pixart": _pixart, "sd3": _sd3, "flux": _flux, "sana": _sana,
                "qwenimage": _qwenimage, "zimage": _zimage, "flux2klein": _flux2klein}
    if family not in builders:
        raise ValueError(f"family {family!r}: choose one of {', '.join(FAMILIES)}")
    directory = Path(directory)
    import torch

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as scratch:
        from transformers import CLIPTokenizer

        clip_tokenizer = CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(scratch))
        builders[family](clip_tokenizer, sample_size).save_pretrained(directory)
    return directory


_BLOCKS = {"block_out_channels": (32, 64), "norm_num_groups": 32}  # two small levels: UNets and VAEs


def tiny_qwen_tokenizer():
    """A byte-level Qwen2 BPE tokenizer with no merges, the chat tokens and a plain chat template (Qwen-Image
    writes its template out; Z-Image applies the tokenizer's)."""
    from transformers import Qwen2Tokenizer

    symbols = list(_bytes_to_unicode().values()) + ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Qwen2Tokenizer(vocab={s: i for i, s in enumerate(symbols)}, merges=[], eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", extra_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tokenizer


def _vae(latent_channels: int = 4, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        **_BLOCKS, in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, **extra,
    )


def _flux_vae():
    """FLUX.1's 16-channel autoencoder (Z-Image uses it too): its latent shift and scale, no quant convs."""
    return _vae(16, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False)


def _unet(sample_size: int, cross_attention_dim: int, **extra):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        **_BLOCKS, sample_size=sample_size, layers_per_block=1, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, **extra,
    )


def _clip(tokenizer, projection: bool = False):
    """A two-layer CLIP text encoder, 32 wide; ``projection`` adds the pooled projection (SDXL, SD3)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _t5(tokenizer, width: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=2 * width, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    ))


def _ddpm_schedule() -> dict:
    """SD's noise schedule (scaled-linear betas, 1000 steps)."""
    return {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
            "steps_offset": 1}


def _sd15(tokenizer, sample_size: int):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        unet=_unet(sample_size, 32), vae=_vae(), text_encoder=_clip(tokenizer), tokenizer=tokenizer,
        scheduler=DPMSolverMultistepScheduler(**_ddpm_schedule()), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def _sdxl(tokenizer, sample_size: int):
    """SDXL: the UNet attends to both encoders' states (32 + 32) and embeds the second's pooled
    projection (32) with six size/crop numbers (6 x 8)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    unet = _unet(sample_size, 64, addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=32 + 6 * 8)
    return StableDiffusionXLPipeline(
        unet=unet, vae=_vae(), text_encoder=_clip(tokenizer), text_encoder_2=_clip(tokenizer, projection=True),
        tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=EulerDiscreteScheduler(**_ddpm_schedule()),
        add_watermarker=False,
    )


def _pixart(_clip_tokenizer, sample_size: int):
    """PixArt-alpha: a DiT with cross-attention to T5 states, learned variance (8 output channels)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    tokenizer = tiny_t5_tokenizer()
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=32, caption_channels=32, sample_size=sample_size, patch_size=2,
    )
    return PixArtAlphaPipeline(
        tokenizer=tokenizer, text_encoder=_t5(tokenizer, 32), vae=_vae(), transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )


def _sd3(tokenizer, sample_size: int):
    """SD3: a joint-attention transformer over the two CLIPs' states (32 + 32, as wide as T5's 64, so
    SD3's zero-padding to T5's width is a no-op) and T5's, pooled CLIP projections (32 + 32), a
    16-channel VAE, flow-matching Euler sampling."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    t5_tokenizer = tiny_t5_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
        pos_embed_max_size=sample_size,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(16, shift_factor=0.0609, scaling_factor=1.5305, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=_clip(tokenizer, projection=True), tokenizer=tokenizer,
        text_encoder_2=_clip(tokenizer, projection=True), tokenizer_2=tokenizer,
        text_encoder_3=_t5(t5_tokenizer, 64), tokenizer_3=t5_tokenizer,
    )


def _flux(tokenizer, _sample_size: int):
    """FLUX.1-dev: double- and single-stream blocks over T5 states (32 wide) and 2x2-packed latents of
    a 16-channel VAE (64 inputs), the CLIP pooled output (32) and the guidance scale as embeddings,
    3-axis rotary positions (4 + 6 + 6 = the head width), flow matching shifted by image size."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    t5_tokenizer = tiny_t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    )
    return FluxPipeline(
        transformer=transformer, scheduler=scheduler,
        vae=_flux_vae(),
        text_encoder=_clip(tokenizer), tokenizer=tokenizer,
        text_encoder_2=_t5(t5_tokenizer, 32), tokenizer_2=t5_tokenizer,
    )


def _sana(_clip_tokenizer, sample_size: int):
    """Sana: a linear-attention DiT with cross-attention to the last states of a Gemma 2 decoder
    (32 wide), a two-level DC-AE (ResBlock, then EfficientViT with multi-scale linear attention),
    flow prediction sampled by DPM-Solver with flow sigmas."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = tiny_gemma_tokenizer()
    text_encoder = Gemma2Model(Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    ))
    blocks = {f"{part}_{key}": value for part in ("encoder", "decoder") for key, value in (
        ("block_types", ("ResBlock", "EfficientViTBlock")), ("block_out_channels", (16, 32)),
        ("layers_per_block", (1, 1)), ("qkv_multiscales", ((), (5,))))}
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=8, scaling_factor=0.41407, **blocks)
    transformer = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=32,
        sample_size=sample_size, patch_size=1,
    )
    scheduler = DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction")
    return SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=scheduler)


def _qwenimage(_clip_tokenizer, _sample_size: int):
    """Qwen-Image: a dual-stream transformer over the last states of a Qwen2.5-VL model (32 wide, the
    vision tower unused for text) and 2x2-packed latents of its causal-conv VAE (4 channels, one
    spatial level here), 3-axis rotary positions (4 + 6 + 6 = the head width), shifted flow matching."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = tiny_qwen_tokenizer()
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
                     "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
                     "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "bos_token_id": None},
        vision_config={"depth": 1, "hidden_size": 32, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 32,
                       "fullatt_block_indexes": [0]},
        vocab_size=len(tokenizer),
    ))
    vae = AutoencoderKLQwenImage(base_dim=16, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192,
        shift_terminal=0.02, time_shift_type="exponential",
    )
    return QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)


def _zimage(_clip_tokenizer, _sample_size: int):
    """Z-Image: a single-stream DiT (context and noise refiners, then joint layers) over the
    second-to-last states of a Qwen3 model (32 wide) and 2x2 patches of a 16-channel VAE, 3-axis rotary
    positions (4 + 6 + 6 = the head width), flow matching at shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = tiny_qwen_tokenizer()
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    ))
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[4, 6, 6], axes_lens=[256, 64, 64],
    )
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), text_encoder=text_encoder, tokenizer=tokenizer,
        vae=_flux_vae(),
        transformer=transformer,
    )


def _flux2klein(_clip_tokenizer, _sample_size: int):
    """FLUX.2 [klein] as released step-distilled (``is_distilled``): double- and single-stream blocks
    over the states of layers 9, 18 and 27 of a Qwen3 causal LM (16 wide, 27 layers, so 48 wide
    stacked) and 2x2 patches of an 8-channel VAE whose latents are batch-normalised, 4-axis rotary
    positions (4 x 4 = the head width), no guidance embedding, flow matching shifted by image size."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = tiny_qwen_tokenizer()
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=27, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=1024, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    ))
    vae = AutoencoderKLFlux2(
        **_BLOCKS, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, latent_channels=8,
    )
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=32, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=48, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=True)
