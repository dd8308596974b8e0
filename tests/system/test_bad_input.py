"""Bad input is refused before Ray starts: one clear line naming the problem and the fix, exit code 2,
no Ray started (so no actor, no GPU reserved) and nothing written to the output directory.

Each case runs the real command (`stablerep-ray train` through ``cli.main``) on the quickstart with
one thing broken. The per-trial resource check of `stablerep-ray tune` is in tests/system/test_tune.py
(`test_too_small_for_one_trial_*`), and a checkpoint whose write was interrupted is ignored on resume
in tests/system/test_pipeline.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from repo import QUICKSTART, ROOT

from stablerep_ray import cli


def write(path: Path, data: str | bytes) -> str:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return str(path)


def write_image_folder(root: Path, classes: list[str], per_class: int = 2) -> str:
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return str(root)


def pipeline_dir(root: Path, index: dict | None) -> str:
    root.mkdir()
    if index is not None:
        (root / "model_index.json").write_text(json.dumps(index))
    return str(root)


def parquet_file(path: Path, columns: dict) -> str:
    pq.write_table(pa.table(columns), path)
    return str(path)


def cut_parquet(path: Path) -> str:
    """A real parquet file cut in half, as an interrupted copy leaves it."""
    data = Path(parquet_file(path, {"caption": ["a red cube"] * 100})).read_bytes()
    return write(path, data[: len(data) // 2])


def full_pipeline(root: Path, without: str) -> str:
    """A complete-looking text-to-image pipeline directory with one component folder missing."""
    components = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    pipeline_dir(root, {"_class_name": "StableDiffusionPipeline", "safety_checker": [None, None],
                        **{c: ["diffusers", "X"] for c in components}})
    for c in components:
        if c != without:
            (root / c).mkdir()
    return str(root)


def eval_pair(t: Path, train: list[str], test: list[str]) -> str:
    return f"{write_image_folder(t / 'train', train)}:{write_image_folder(t / 'test', test)}"


def files_in(root: Path, files: dict[str, str]) -> str:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        write(root / name, data)
    return str(root)


# (case id, overrides built from tmp_path, what the one error line must say)
CASES = [
    ("captions-missing",
     lambda t: {"captions.source": str(t / "nope.txt")},
     ["captions.source", "nope.txt does not exist", "check the path"]),
    ("captions-empty-file",
     lambda t: {"captions.source": write(t / "empty.txt", "")},
     ["captions.source", "holds no captions", "non-empty caption file"]),
    ("captions-only-blank-lines",
     lambda t: {"captions.source": write(t / "blank.txt", "\n  \n\t\n")},
     ["holds no captions (3 blank rows)"]),
    ("captions-empty-directory",
     lambda t: {"captions.source": str((t / "captions").mkdir() or t / "captions")},
     ["captions.source", "no caption files", "captions.format"]),
    ("csv-lacks-column",
     lambda t: {"captions.source": write(t / "c.csv", "text,url\na red cube,x\n"), "captions.column": "caption"},
     ["captions.column", "has no column 'caption'", "['text', 'url']", "set captions.column"]),
    ("jsonl-lacks-column",
     lambda t: {"captions.source": write(t / "c.jsonl", '{"text": "a red cube"}\n'), "captions.column": "caption"},
     ["captions.column", "has no column 'caption'", "set captions.column"]),
    ("parquet-lacks-column",
     lambda t: {"captions.source": parquet_file(t / "c.parquet", {"prompt": ["a red cube"]}),
                "captions.column": "caption"},
     ["captions.column", "has no column 'caption'", "['prompt']"]),
    ("captions-not-utf8",
     lambda t: {"captions.source": write(t / "latin1.txt", b"a red cube\n" + "un caf\u00e9 bleu\n".encode("latin-1"))},
     ["latin1.txt: byte 17", "not valid UTF-8", "re-encode the caption file as UTF-8"]),
    ("caption-far-longer-than-context",
     lambda t: {"captions.source": write(t / "long.txt", "a red cube\n" + "a photo of a cube " * 400 + "\n")},
     ["long.txt", "7199 characters", "captions.max_chars=2000", "77 tokens", "captions.column"]),
    ("model-missing",
     lambda t: {"generator.backend": "diffusers", "generator.model": str(t / "no-such-pipeline")},
     ["generator.model", "does not exist", "make-tiny-pipeline"]),
    ("model-not-a-pipeline",
     lambda t: {"generator.backend": "diffusers", "generator.model": pipeline_dir(t / "weights", None)},
     ["generator.model", "no model_index.json", "not a diffusers pipeline"]),
    ("model-not-text-to-image",
     lambda t: {"generator.backend": "diffusers", "generator.model": pipeline_dir(
         t / "vae-only", {"_class_name": "AutoencoderKL", "vae": ["diffusers", "AutoencoderKL"]})},
     ["generator.model", "AutoencoderKL", "unet", "text-to-image pipeline is needed"]),
    ("model-img2img",
     lambda t: {"generator.backend": "diffusers", "generator.model": pipeline_dir(
         t / "img2img", {"_class_name": "StableDiffusionImg2ImgPipeline", **{c: ["x", "y"] for c in (
             "unet", "vae", "text_encoder", "tokenizer", "scheduler")}})},
     ["generator.model", "StableDiffusionImg2ImgPipeline", "text-to-image"]),
    ("more-workers-than-cpus",
     lambda t: {"train.num_workers": "16"},
     ["train.num_workers", "cluster.num_cpus"]),
    ("eval-set-one-class",
     lambda t: {"eval.data": write_image_folder(t / "eval", ["cat"])},
     ["eval data", "only one class ('cat')", "at least two classes"]),
    ("eval-set-empty",
     lambda t: {"eval.data": str((t / "eval").mkdir() or t / "eval")},
     ["eval data", "no images", "empty"]),
    ("eval-parquet-one-label",
     lambda t: {"eval.data": parquet_file(t / "eval.parquet", {"image": [b"png"] * 3, "label": [4, 4, 4]})},
     ["eval data", "only one class ('4')"]),
    # -- caption encodings and binary content
    ("captions-utf16-with-bom",
     lambda t: {"captions.source": write(t / "u16.txt", "a red cube\nblue\n".encode("utf-16"))},
     ["u16.txt", "UTF-16/32 byte-order mark", "re-encode the caption file as UTF-8"]),
    ("csv-utf16-with-bom",
     lambda t: {"captions.source": write(t / "u16.csv", "caption\na red cube\n".encode("utf-16"))},
     ["u16.csv", "UTF-16/32 byte-order mark", "re-encode the caption file as UTF-8"]),
    ("jsonl-utf16-without-bom",
     lambda t: {"captions.source": write(t / "u16.jsonl", '{"caption": "a"}\n'.encode("utf-16-le"))},
     ["u16.jsonl: byte 1", "NUL byte", "re-encode the caption file as UTF-8"]),
    ("captions-nul-byte",
     lambda t: {"captions.source": write(t / "nul.txt", "a red cube\nblue\x00 sphere\n")},
     ["nul.txt: byte 15", "NUL byte", "binary", "re-encode"]),
    # -- empty, header-only, truncated and corrupt files
    ("csv-empty-no-header",
     lambda t: {"captions.source": write(t / "empty.csv", "")},
     ["empty.csv", "cannot parse as csv", "header row naming captions.column"]),
    ("csv-header-only",
     lambda t: {"captions.source": write(t / "h.csv", "caption,url\n")},
     ["captions.source", "h.csv holds no captions;", "non-empty caption file"]),
    ("tsv-header-only",
     lambda t: {"captions.source": write(t / "h.tsv", "caption\turl\r\n")},
     ["captions.source", "h.tsv holds no captions;"]),
    ("jsonl-empty",
     lambda t: {"captions.source": write(t / "e.jsonl", "")},
     ["captions.source", "e.jsonl holds no captions;"]),
    ("jsonl-truncated-last-line",
     lambda t: {"captions.source": write(t / "cut.jsonl", '{"caption": "a red cube"}\n{"caption": "blu')},
     ["cut.jsonl: byte 26: invalid JSON", "fix or remove that line"]),
    ("parquet-empty-file",
     lambda t: {"captions.source": write(t / "e.parquet", b"")},
     ["captions.source", "e.parquet is not a readable parquet file", "re-export it"]),
    ("parquet-truncated",
     lambda t: {"captions.source": cut_parquet(t / "cut.parquet")},
     ["captions.source", "cut.parquet is not a readable parquet file", "re-export it"]),
    ("parquet-not-parquet",
     lambda t: {"captions.source": write(t / "text.parquet", "a red cube\nblue\n")},
     ["captions.source", "text.parquet is not a readable parquet file"]),
    # -- null and non-text cells
    ("csv-all-cells-empty",
     lambda t: {"captions.source": write(t / "n.csv", 'caption,url\n,x\n"",y\n')},
     ["n.csv holds no captions (2 blank rows)"]),
    ("jsonl-all-null",
     lambda t: {"captions.source": write(t / "n.jsonl", '{"caption": null}\n{"caption": ""}\n')},
     ["n.jsonl holds no captions (2 blank rows)"]),
    ("parquet-all-null",
     lambda t: {"captions.source": parquet_file(t / "n.parquet", {"caption": pa.nulls(3)})},
     ["n.parquet holds no captions (3 blank rows)"]),
    ("jsonl-caption-not-text",
     lambda t: {"captions.source": write(t / "num.jsonl", '{"caption": ["a", "b"]}\n')},
     ["captions.column", "num.jsonl: byte 0", "holds [\"a\", \"b\"], not text", "set captions.column"]),
    ("parquet-caption-not-text",
     lambda t: {"captions.source": parquet_file(t / "i.parquet", {"caption": [1, 2]})},
     ["captions.column", "i.parquet column 'caption' holds int64, not text"]),
    # -- incomplete model directories
    ("model-index-not-json",
     lambda t: {"generator.backend": "diffusers",
                "generator.model": files_in(t / "p", {"model_index.json": '{"_class_name": "StableDiff'})},
     ["generator.model", "model_index.json is not valid JSON", "fetch the pipeline again"]),
    ("model-component-folder-missing",
     lambda t: {"generator.backend": "diffusers", "generator.model": full_pipeline(t / "p", without="unet")},
     ["generator.model", "lists unet in model_index.json but has no unet/ folder", "fetch the whole"]),
    # -- storage
    ("storage-path-under-a-file",
     lambda t: {"cluster.storage_path": str(Path(write(t / "f", "x")) / "ckpt")},
     ["cluster.storage_path", "f is a file", "choose another directory"]),
    ("storage-path-unknown-scheme",
     lambda t: {"cluster.storage_path": "nosuchscheme://bucket/x"},
     ["cluster.storage_path", "cannot open 'nosuchscheme://bucket/x'", "supported scheme"]),
    # -- a cluster nothing answers at (port 1: nothing listens there)
    ("cluster-address-unreachable",
     lambda t: {"cluster.address": "127.0.0.1:1"},
     ["cluster.address", "nothing answers at 127.0.0.1:1", "ray up cluster.yaml"]),
    # -- eval directories of the wrong shape
    ("eval-data-is-an-image-file",
     lambda t: {"eval.data": write(t / "one.png", b"png")},
     ["eval data", "one.png", "a single file must be .parquet"]),
    ("eval-images-without-class-folders",
     lambda t: {"eval.data": write_image_folder(t / "eval", ["."])},  # ".": images in the root itself
     ["eval data", "lie directly in the root", "one subdirectory per class"]),
    ("eval-class-folders-without-images",
     lambda t: {"eval.data": files_in(t / "eval", {"cat/a.txt": "x", "dog/b.json": "{}"})},
     ["eval data", "holds no images", "the dataset is empty"]),
    ("eval-test-part-missing",
     lambda t: {"eval.data": f"{write_image_folder(t / 'train', ['cat', 'dog'])}:{t / 'test'}"},
     ["eval data", "test'", "path not found"]),
    ("eval-test-classes-not-in-train",
     lambda t: {"eval.data": eval_pair(t, ["cat", "dog"], ["cat", "bird"])},
     ["eval data", "test classes ['bird'] do not occur in the train set", "share class names"]),
    # -- a finite source too small for the run
    ("captions-too-few-without-repeat",  # 200 steps x 16 captions x 2 workers, each served once
     lambda t: {"captions.source": write(t / "few.txt", "a red cube\n" * 100), "captions.repeat": "false"},
     ["captions.repeat: false", "holds 100 captions", "at least 6400 needed", "set captions.repeat=true"]),
    ("captions-without-line-ends",  # read no further than the limit, not the whole file
     lambda t: {"captions.source": write(t / "one-line.jsonl", "x" * (17 << 20))},
     ["one-line.jsonl: byte 0", "a line of more than 16 MiB", "not one caption or JSON object per line"]),
    # -- an encoder timm cannot build (built on the meta device: no memory, no Ray)
    ("model-unknown", lambda t: {"model.name": "vit_nosuch_patch16"},
     ["model.name: Unknown model (vit_nosuch_patch16)", "timm.list_models"]),
    ("model-kwargs-bogus", lambda t: {"model.kwargs": "{patch_size: 8, bogus_width: 3}"},
     ["model.kwargs:", "bogus_width"]),
    ("grad-checkpointing-unsupported",
     lambda t: {"model.name": "convit_tiny", "model.kwargs": "{}", "model.grad_checkpointing": "true"},
     ["model.grad_checkpointing: timm's convit_tiny does not support it"]),
    # -- numbers that are not finite
    ("base-lr-nan", lambda t: {"train.base_lr": ".nan"}, ["train.base_lr", "finite number"]),
    ("temperature-inf", lambda t: {"train.temperature": ".inf"}, ["train.temperature", "finite number"]),
    ("guidance-scale-nan",
     lambda t: {"generator.guidance_scale": ".nan"}, ["generator.guidance_scale", "finite number"]),
]


@pytest.mark.parametrize("make_overrides,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_fails_before_ray_with_one_clear_line(tmp_path, capsys, make_overrides, expected):
    import ray

    out = tmp_path / "out"
    overrides = make_overrides(tmp_path)
    argv = ["train", str(QUICKSTART), "--output-dir", str(out)]
    for key, value in overrides.items():
        argv += ["--set", f"{key}={value}"]

    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for text in expected:
        assert text in lines[0], lines[0]
    assert not ray.is_initialized(), "Ray was started for a run that could never work"
    assert not out.exists(), f"something was written: {list(out.rglob('*'))}"


def test_command_exit_code_and_single_line(tmp_path):
    """The installed command, as a user runs it: exit status 2, one line on stderr, no Ray."""
    proc = subprocess.run(
        [sys.executable, "-m", "stablerep_ray.cli", "train", str(QUICKSTART),
         "--output-dir", str(tmp_path / "out"), "--set", f"captions.source={tmp_path / 'missing.txt'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: captions.source: {tmp_path / 'missing.txt'} does not exist; check the path"
    ]
    assert "Ray runtime started" not in proc.stdout + proc.stderr
    assert not (tmp_path / "out").exists()


def test_output_dir_under_a_file_is_refused_before_anything_is_written(tmp_path, capsys):
    import ray

    blocker = Path(write(tmp_path / "f", "x"))
    assert cli.main(["train", str(QUICKSTART), "--output-dir", str(blocker / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: output_dir: "), lines
    assert "f is a file" in lines[0] and "choose another directory" in lines[0]
    assert not ray.is_initialized() and blocker.read_text() == "x"


def test_output_dir_as_uri_is_refused(tmp_path):
    from stablerep_ray.config import ConfigError
    from stablerep_ray.storage import check_writable

    with pytest.raises(ConfigError, match="output_dir: s3://b/x is a URI.*cluster.storage_path"):
        check_writable("s3://b/x", "output_dir", remote=False)


def test_writable_check_creates_nothing(tmp_path):
    from stablerep_ray.storage import check_writable

    check_writable(str(tmp_path / "new" / "deeper"), "output_dir")
    check_writable(f"file://{tmp_path / 'other'}", "cluster.storage_path")
    assert list(tmp_path.iterdir()) == []


# -- inputs that must be read correctly ------------------------------------------------------------
def read_all(source: str, chunk_bytes: int = 1 << 20) -> tuple[list[str], list[int], int]:
    """(captions, positions, blanks) of one pass, through the same functions the Ray tasks use;
    the preflight's inspection must agree."""
    from stablerep_ray.captions.files import inspect_captions, plan_chunks, read_chunk
    from stablerep_ray.config import CaptionsConfig

    cfg = CaptionsConfig(source=source)
    texts, positions, blanks = [], [], 0
    for chunk in plan_chunks(cfg, chunk_bytes):
        ids, chunk_texts, chunk_blanks = read_chunk(cfg, chunk)
        texts, positions, blanks = texts + chunk_texts, positions + ids, blanks + chunk_blanks
    stats = inspect_captions(cfg)
    assert (stats.captions, stats.blanks) == (len(texts), blanks)
    return texts, positions, blanks


BOM = "\ufeff"
CAPTIONS = ["a red cube", "blue sphere"]
SAME_TWO_CAPTIONS = {
    "txt": "a red cube\nblue sphere\n",
    "csv": "caption,url\na red cube,x\nblue sphere,y\n",
    "tsv": "caption\turl\na red cube\tx\nblue sphere\ty\n",
    "jsonl": '{"caption": "a red cube"}\n{"caption": "blue sphere"}\n',
}


@pytest.mark.parametrize("ending", ["\n", "\r\n", "\r"], ids=["lf", "crlf", "cr"])
@pytest.mark.parametrize("bom", [False, True], ids=["plain", "bom"])
@pytest.mark.parametrize("fmt", sorted(SAME_TWO_CAPTIONS))
def test_bom_and_line_endings_are_read_correctly(tmp_path, fmt, bom, ending):
    """A UTF-8 byte-order mark is not part of the first caption (or csv column name); CRLF and
    CR-only files split into lines with no '\\r' left; a last line without a line end still counts."""
    text = SAME_TWO_CAPTIONS[fmt].replace("\n", ending)
    for body in (text, text.removesuffix(ending)):
        texts, _, blanks = read_all(write(tmp_path / f"c.{fmt}", (BOM if bom else "") + body))
        assert (texts, blanks) == (CAPTIONS, 0), (fmt, bom, ending, body)


def test_mixed_line_endings_split_alike_across_chunk_and_read_boundaries(tmp_path):
    """Byte-range chunks of any size and any read block size give the same lines, each in one chunk."""
    import io
    import random

    from stablerep_ray.captions.files import _split_lines

    rng = random.Random(0)
    for _ in range(60):
        words = [rng.choice(["a", "bb", "", "ccc d"]) for _ in range(rng.randint(0, 10))]
        data = "".join(w + rng.choice(["\n", "\r\n", "\r"]) for w in words) + rng.choice(["", "tail"])
        expected = [w for w in words + ["tail"] * data.endswith("tail") if w]
        for block in (1, 2, 3):
            lines = [line.decode() for _, line in _split_lines(io.BytesIO(data.encode()), 0, "m.txt", block)]
            assert [line for line in lines if line] == expected, (data, block)
        for chunk_bytes in (1, 2, 5):
            if expected:
                texts, positions, _ = read_all(write(tmp_path / "m.txt", data), chunk_bytes)
                assert texts == expected and positions == sorted(set(positions)), (data, chunk_bytes)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_null_and_empty_cells_are_skipped_and_counted(tmp_path, fmt):
    path = tmp_path / f"n.{fmt}"
    if fmt == "csv":
        write(path, 'caption,url\na red cube,x\n,y\n"",z\nblue sphere,w\n')
    elif fmt == "jsonl":
        write(path, '{"caption": "a red cube"}\n{"caption": null}\n\n{"caption": "blue sphere"}')
    else:
        parquet_file(path, {"caption": pa.array(["a red cube", None, "", "blue sphere"]).dictionary_encode()})
    texts, _, blanks = read_all(str(path))
    assert texts == CAPTIONS and blanks == 2


def test_preflight_reads_a_windows_export(tmp_path):
    """The whole preflight on a BOM + CRLF csv without a final line end: it counts the captions
    and writes nothing."""
    from stablerep_ray.config import load_config

    source = write(tmp_path / "export.csv", BOM + "caption,url\r\na red cube,x\r\nblue sphere,y")
    config = load_config(QUICKSTART, [f"captions.source={source}", f"output_dir={tmp_path / 'out'}",
                                      f"cluster.storage_path={tmp_path / 'ckpt'}"])
    assert cli.preflight(config) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export.csv"]


def test_caption_supply_counts_the_steps_the_loop_runs():
    """--max-steps beyond train.steps trains train.steps (200 x 32 groups: 6,400); fewer need fewer."""
    from stablerep_ray.config import ConfigError, load_config

    config = load_config(QUICKSTART, ["captions.repeat=false"])
    cli.check_caption_supply_of_one_pass(config, 6400, steps=10_000)
    cli.check_caption_supply_of_one_pass(config, 320, steps=10)
    with pytest.raises(ConfigError, match="at least 6400 needed"):
        cli.check_caption_supply_of_one_pass(config, 6399, steps=10_000)
