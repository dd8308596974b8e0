"""Bad input is refused before Ray starts: one clear line naming the problem and the fix, exit code 2,
no Ray started (so no actor, no GPU reserved) and nothing written to the output directory.

Each case runs the real command (`stablerep-ray train` through ``cli.main``) on the quickstart with
one thing broken. The per-trial resource check of `stablerep-ray tune` is in tests/test_tune.py
(`test_too_small_for_one_trial_*`), and a checkpoint whose write was interrupted is ignored on resume
in tests/test_pipeline.py.
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

from stablerep_ray import cli

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


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
     lambda t: {"captions.source": write(t / "latin1.txt", "a red cube\n".encode() + "un caf\u00e9 bleu\n".encode("latin-1"))},
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
