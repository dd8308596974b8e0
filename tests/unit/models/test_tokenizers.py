"""Tokenizers: framing (start, ids, end, zero padding), truncation, determinism, offline loading."""

import json
import pickle

import pytest
import torch

from stablerep_ray.config import ConfigError, GeneratorConfig
from stablerep_ray.models.tokenizers import HFTokenizer, WordTokenizer, load_tokenizer

MERGES = [("c", "a"), ("ca", "t</w>"), ("r", "e"), ("re", "d</w>")]


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP byte-to-unicode table: the 256 base symbols of a byte-level BPE vocabulary."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _write_clip_tokenizer(directory):
    """A tiny CLIP BPE vocabulary (bytes, end-of-word bytes, a few merges, specials): no downloads."""
    directory.mkdir(parents=True)
    alphabet = _byte_alphabet()
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES)
    )
    return directory


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return _write_clip_tokenizer(tmp_path_factory.mktemp("clip") / "tok")


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    _write_clip_tokenizer(root / "tokenizer")
    return root


def _check_framing(tokens, lengths, start, end, context_length):
    assert tokens.dtype == lengths.dtype == torch.long
    assert tokens.shape == (len(lengths), context_length)
    for row, n in zip(tokens, lengths.tolist()):
        assert 2 <= n <= context_length
        assert row[0] == start and row[n - 1] == end
        assert (row[1 : n - 1] != end).all()
        assert (row[n:] == 0).all()


# -- WordTokenizer ---------------------------------------------------------------------------------
def test_word_tokenizer_framing_and_padding():
    tok = WordTokenizer()
    tokens, lengths = tok.encode(["a red cat", "", "Two   DOGS, running!"], context_length=8)
    _check_framing(tokens, lengths, tok.START, tok.END, 8)
    assert lengths.tolist() == [5, 2, 5]
    assert tok.vocab_size == 4096 + 3
    assert int(tokens.max()) < tok.vocab_size


def test_word_tokenizer_normalises_case_and_punctuation():
    tok = WordTokenizer()
    a, _ = tok.encode(["A Red-cat, 2 times"], 16)
    b, _ = tok.encode(["a red cat times"], 16)
    assert torch.equal(a, b)


def test_word_tokenizer_truncates_but_keeps_end_token():
    tok = WordTokenizer()
    tokens, lengths = tok.encode(["one two three four five six seven"], context_length=5)
    _check_framing(tokens, lengths, tok.START, tok.END, 5)
    assert lengths.tolist() == [5]
    assert tokens[0, 1:4].tolist() == [tok.word_id(w) for w in ("one", "two", "three")]


def test_word_tokenizer_ids_are_pinned():
    # Pinned ids: crc32 buckets must not depend on PYTHONHASHSEED, the worker or the machine.
    tokens, _ = WordTokenizer().encode(["a red cat"], 6)
    assert tokens.tolist() == [[1, 3654, 3986, 939, 2, 0]]
    assert WordTokenizer(buckets=16).vocab_size == 19


def test_context_length_must_hold_start_and_end():
    with pytest.raises(ValueError, match="context_length"):
        WordTokenizer().encode(["cat"], 1)


# -- HFTokenizer ------------------------------------------------------------------------------------
def test_hf_tokenizer_matches_clip_framing(clip_dir):
    tok = HFTokenizer(str(clip_dir))
    start, end = tok._tokenizer.bos_token_id, tok._tokenizer.eos_token_id
    assert tok.vocab_size == 2 * 256 + len(MERGES) + 2
    captions = ["a red cat", "Cat!", ""]
    tokens, lengths = tok.encode(captions, context_length=16)
    _check_framing(tokens, lengths, start, end, 16)
    reference = tok._tokenizer(captions)["input_ids"]  # transformers' own start/end framing
    for row, n, ref in zip(tokens, lengths.tolist(), reference):
        assert row[:n].tolist() == ref
    assert tokens[0, 1:-1].tolist()[: lengths[0] - 2] == [
        tok._tokenizer.convert_tokens_to_ids(t) for t in ("a</w>", "red</w>", "cat</w>")
    ]


def test_hf_tokenizer_truncates_but_keeps_end_token(clip_dir):
    tok = HFTokenizer(str(clip_dir))
    end = tok._tokenizer.eos_token_id
    for context_length in (2, 4, 7):
        tokens, lengths = tok.encode(["a red cat on a red mat"] * 2, context_length)
        _check_framing(tokens, lengths, tok._tokenizer.bos_token_id, end, context_length)
        assert lengths.tolist() == [context_length] * 2


def test_hf_tokenizer_finds_pipeline_subfolder(clip_dir, pipeline_dir):
    reference = HFTokenizer(str(clip_dir)).encode(["a red cat"], 8)
    for tok in (
        HFTokenizer(str(pipeline_dir)),
        HFTokenizer(str(pipeline_dir), subfolder="tokenizer"),
    ):
        assert all(torch.equal(a, b) for a, b in zip(tok.encode(["a red cat"], 8), reference))


# -- load_tokenizer -----------------------------------------------------------------------------------
def test_load_tokenizer_sources(clip_dir, pipeline_dir):
    assert isinstance(load_tokenizer("", GeneratorConfig(backend="simulator")), WordTokenizer)
    explicit = load_tokenizer(str(clip_dir), GeneratorConfig(backend="simulator"))
    assert isinstance(explicit, HFTokenizer) and explicit.path == str(clip_dir)
    from_pipeline = load_tokenizer("", GeneratorConfig(backend="diffusers", model=str(pipeline_dir)))
    assert (
        isinstance(from_pipeline, HFTokenizer) and from_pipeline.vocab_size == explicit.vocab_size
    )


@pytest.mark.parametrize(
    "case", ["missing_dir", "empty_dir", "pipeline_without_tokenizer", "diffusers_without_model"]
)
def test_load_tokenizer_errors_name_the_key(case, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "model_index.json").write_text("{}")
    args = {
        "missing_dir": (str(tmp_path / "nope"), GeneratorConfig(backend="simulator")),
        "empty_dir": (str(tmp_path / "empty"), GeneratorConfig(backend="simulator")),
        "pipeline_without_tokenizer": ("", GeneratorConfig(backend="diffusers", model=str(tmp_path))),
        "diffusers_without_model": ("", GeneratorConfig(backend="diffusers")),
    }[case]
    with pytest.raises(ConfigError, match=r"model\.text\.tokenizer"):
        load_tokenizer(*args)


def test_tokenizers_pickle_and_accept_empty_batches(clip_dir):
    # Ray ships tokenizers to workers by pickling them.
    for tok in (WordTokenizer(), HFTokenizer(str(clip_dir))):
        clone = pickle.loads(pickle.dumps(tok))
        for a, b in zip(clone.encode(["a red cat"], 8), tok.encode(["a red cat"], 8)):
            assert torch.equal(a, b)
        tokens, lengths = tok.encode([], 8)
        assert tokens.shape == (0, 8) and lengths.shape == (0,)
