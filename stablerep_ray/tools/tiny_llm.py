"""Build a tiny, randomly initialised causal language model and save it with ``save_pretrained``.

The caption-synthesis backends load ``AutoModelForCausalLM.from_pretrained(id or dir)``; offline tests
and laptops need a directory that takes that very path without a download. This is a Llama-architecture
model (the family SynCLR sampled from) at toy size with a byte-level BPE tokenizer without merges (every
byte is a token). Its completions are random bytes: use it for plumbing, the template backend to learn.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .tiny_pipeline import _bytes_to_unicode

EOS = "<|endoftext|>"


def write_byte_tokenizer(directory: Path):
    """A GPT-2 style byte-level tokenizer of 257 tokens (256 bytes and end-of-text), saved to ``directory``."""
    from transformers import GPT2TokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    vocab = {symbol: i for i, symbol in enumerate(_bytes_to_unicode().values())}
    vocab[EOS] = len(vocab)
    build = directory / "_build"
    build.mkdir(exist_ok=True)
    (build / "vocab.json").write_text(json.dumps(vocab))
    (build / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = GPT2TokenizerFast(str(build / "vocab.json"), str(build / "merges.txt"), unk_token=EOS,
                                  bos_token=EOS, eos_token=EOS, pad_token=EOS, model_max_length=2048)
    tokenizer.save_pretrained(directory)
    for leftover in build.iterdir():
        leftover.unlink()
    build.rmdir()
    return tokenizer


def make_tiny_llm(directory: str | Path, seed: int = 0) -> Path:
    """Save a tiny random Llama causal LM and its tokenizer to ``directory``; returns the directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    tokenizer = write_byte_tokenizer(directory)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory
