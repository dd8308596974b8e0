"""The transformers backend: a causal language model from ``from_pretrained(id or dir)`` completing prompts.

Sampling (temperature, then top-p) is done by a logits processor that draws each prompt's tokens from
that prompt's own seed, and ``generate`` then takes its choice greedily: a completion depends on its
prompt and seed, not on the other prompts of its batch (up to float rounding), as vLLM's per-request
seeds do. The same class serves the in-process preview and the test's small HTTP server.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ...config import SynthConfig
from ...hub import LANGUAGE_MODEL, loading
from ...memory import NamesSetting, loading_model
from ...precision import resolve_dtype
from ...runtime import quiet_model_loading, say_model_ready
from .rows import finish_batch


class _SeededSampling:
    """A logits processor: row b's token at step t is drawn with the uniform number u[b, t] of its seed."""

    def __init__(self, seeds: list[int], prompt_length: int, temperature: float, top_p: float, steps: int):
        self.uniform = torch.tensor(np.stack([np.random.default_rng(int(s)).random(steps) for s in seeds]))
        self.prompt_length, self.temperature, self.top_p = prompt_length, temperature, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float()
        if self.temperature == 0:
            choice = scores.argmax(-1)
        else:
            probs, order = torch.softmax(scores / self.temperature, -1).sort(-1, descending=True)
            probs = probs * ((probs.cumsum(-1) - probs) < self.top_p)  # the nucleus (never empty)
            cdf = probs.cumsum(-1) / probs.sum(-1, keepdim=True)
            step = input_ids.shape[1] - self.prompt_length
            u = self.uniform[: len(scores), step : step + 1].to(cdf)
            choice = order.gather(1, torch.searchsorted(cdf, u).clamp(max=cdf.shape[1] - 1)).squeeze(1)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, choice[:, None], 0.0)


class CausalLM:
    """A causal LM and its tokenizer, loaded once, completing batches of prompts."""

    def __init__(self, model: str, dtype: str = "auto", gpu: bool = False):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        quiet_model_loading()
        started = time.perf_counter()
        self.device = torch.device("cuda" if gpu and torch.cuda.is_available() else "cpu")
        with loading(model, LANGUAGE_MODEL) as local:
            self.tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=local)
            self.model = AutoModelForCausalLM.from_pretrained(model, dtype=resolve_dtype(dtype, self.device),
                                                              local_files_only=local)
        self.tokenizer.padding_side = "left"  # generation continues every row from its last token
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.to(self.device).eval()
        say_model_ready("captions", model, self.model, self.device, self.model.dtype, started)

    @torch.inference_mode()
    def complete(self, prompts: list[str], seeds: list[int], temperature: float, top_p: float,
                 max_tokens: int) -> list[str]:
        """One completion per prompt, stopped at its first newline or at ``max_tokens`` new tokens."""
        from transformers import GenerationConfig, LogitsProcessorList

        inputs = self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.device)
        length = inputs["input_ids"].shape[1]
        sampling = _SeededSampling(seeds, length, temperature, top_p, max_tokens)
        settings = GenerationConfig(
            max_new_tokens=max_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id, stop_strings=["\n"],
        )
        out = self.model.generate(**inputs, generation_config=settings, tokenizer=self.tokenizer,
                                  logits_processor=LogitsProcessorList([sampling]))
        return self.tokenizer.batch_decode(out[:, length:], skip_special_tokens=True)


class TransformersCaptioner:
    """The Ray Data callable of the transformers backend: prompt rows -> stream rows."""

    def __init__(self, cfg: SynthConfig, detail: bool = False):
        if cfg.num_gpus_per_actor == 0:
            torch.set_num_threads(max(1, int(cfg.num_cpus_per_actor)))
        self.cfg, self.detail = cfg, detail
        with loading_model("captions.synth", cfg.model, cfg.dtype):
            self.lm = CausalLM(cfg.model, cfg.dtype, gpu=cfg.num_gpus_per_actor > 0)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        c = self.cfg
        work = f"completing {len(batch['prompt'])} prompts of up to {c.max_tokens} new tokens"
        with NamesSetting("captions.synth.batch_size", work, "lower captions.synth.batch_size"):
            completions = self.lm.complete([str(p) for p in batch["prompt"]], [int(s) for s in batch["seed"]],
                                           c.temperature, c.top_p, c.max_tokens)
        return finish_batch(batch, completions, c.max_chars, self.detail)
