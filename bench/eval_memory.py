"""Memory of offline evaluation over set size: peaks at N and 10N images should be about the same.

    uv run python -m bench.eval_memory                    # 2,000 and 20,000 images (~3 min on 2 cores)
    uv run python -m bench.eval_memory --images 500 --factor 4 --size 64

Writes two ImageFolders of JPEG files (``--images`` and ``--factor`` x that many, ``--classes``
classes, ``--size`` px: larger than the model's 32 px input, as real photos are) and a tiny random
checkpoint to a temporary directory, then runs ``stablerep_ray.evaluation.evaluate`` (kNN, the
feature cache off, features through the Ray Data actor pool) on each set in its own driver process
with its own private Ray session. The sampler of ``bench.memory`` records RSS over the driver and
every process of its Ray session, the same minus shared pages, and the object store's bytes in use.
Prints peak(10N) / peak(N) for each; the target is <= 1.3.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import common
from .memory import Sampler

MODULE = "bench.eval_memory"
TARGET = 1.3
TINY_MODEL = {"name": "vit_tiny_patch16_224", "image_size": 32, "kwargs": {"patch_size": 8, "depth": 2},
              "head_hidden_dim": 64, "embed_dim": 32}


def write_checkpoint(directory: Path) -> Path:
    import torch

    from stablerep_ray.config import from_dict
    from stablerep_ray.models import build_model, save_model

    torch.manual_seed(0)
    config = from_dict({"model": TINY_MODEL, "generator": {"backend": "simulator"},
                        "captions": {"source": "captions.txt"}, "train": {"batch_size": 12, "num_workers": 2}})
    directory.mkdir(parents=True, exist_ok=True)
    save_model(build_model(config), config, directory)
    return directory


def write_folder(root: Path, images: int, classes: int, size: int) -> Path:
    """``root/<class>/<i>.jpg``: a smooth colour field per class plus per-image noise (a few KB each)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    for c in range(classes):
        (root / f"class{c:03d}").mkdir(parents=True, exist_ok=True)
    for i in range(images):
        c = i % classes
        base = np.stack([np.outer(ramp, ramp) * (40 + 20 * c), ramp[None, :].repeat(size, 0) * 255,
                         ramp[:, None].repeat(size, 1) * (255 - 20 * c)], axis=-1)
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"class{c:03d}" / f"{i:06d}.jpg", quality=85)
    return root


def one_run(checkpoint: str, data: str, interval: float, batch_size: int) -> dict:
    import ray

    from stablerep_ray.config import EvalConfig
    from stablerep_ray.evaluation import evaluate

    common.start_ray(num_cpus=4)
    sampler = Sampler(interval)
    sampler.start()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        results = evaluate(checkpoint, data, EvalConfig(batch_size=batch_size), output=out,
                           use_ray=True, cache=False)
    wall = time.perf_counter() - t0
    stats = sampler.stop()
    ray.shutdown()
    stats.update({"images": results["num_train"] + results["num_test"], "wall_s": wall,
                  "knn_top1": results["metrics"]["knn_top1"], "features_via": results["features_via"]})
    print(f"  {stats['images']:6d} images ({wall:.0f} s): peak RSS {stats['peak_rss'] / 2**30:.2f} GiB "
          f"(private {stats['peak_rss_private'] / 2**30:.2f} GiB, {stats['peak_processes']} processes), "
          f"object store {stats['peak_object_store'] / 2**20:.1f} MiB", flush=True)
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = common.arg_parser(MODULE, __doc__)
    parser.add_argument("--images", type=int, default=2000, help="N: images of the small set")
    parser.add_argument("--factor", type=int, default=10, help="the large set has factor x N images")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--size", type=int, default=128, help="side of the JPEG files, px")
    parser.add_argument("--batch-size", type=int, default=256, help="eval.batch_size")
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between samples")
    parser.add_argument("--single", help=argparse.SUPPRESS)  # internal: one run on this data dir
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.single:
        stats = one_run(args.checkpoint, args.single, args.interval, args.batch_size)
        Path(args.out).write_text(json.dumps(stats))
        return 0

    sizes = (args.images, args.images * args.factor)
    print(f"ImageFolders of {sizes[0]:,} and {sizes[1]:,} JPEG images ({args.size} px, {args.classes} "
          f"classes), tiny ViT at 32 px", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_checkpoint(Path(tmp) / "checkpoint")
        runs = {}
        for n in sizes:
            data = write_folder(Path(tmp) / f"set-{n}", n, args.classes, args.size)
            out = Path(tmp) / f"stats-{n}.json"
            cmd = [sys.executable, "-m", MODULE, "--single", str(data), "--checkpoint", str(checkpoint),
                   "--out", str(out), "--interval", str(args.interval), "--batch-size", str(args.batch_size)]
            subprocess.run(cmd, check=True, cwd=common.ROOT)
            runs[n] = json.loads(out.read_text())
    small, large = runs[sizes[0]], runs[sizes[1]]
    ratios = common.memory_ratios(small, large)
    summary = {"images": list(sizes), "image_px": args.size, "classes": args.classes,
               "batch_size": args.batch_size, "small": small, "large": large, "ratios": ratios,
               "target": TARGET, "pass": ratios["peak_rss"] is not None and ratios["peak_rss"] <= TARGET}
    path = common.write_result("eval_memory", summary, MODULE)
    print(f"\ncommand: {common.command_line(MODULE)}")
    common.print_memory_ratios(small, large, f"{sizes[0]:,}", f"{sizes[1]:,}", TARGET)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
