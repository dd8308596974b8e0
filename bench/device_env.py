"""Pack what a lent GPU machine lacks to run ``bench.gpu``, small enough to travel with the repository.

    uv run python -m bench.device_env                   # writes .devenv/site.tar.xz (~50 MB)
    # then on the GPU machine (the device tool's `run`, carry [".devenv"]):
    #   tar -xJf .devenv/site.tar.xz -C /tmp && export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1
    #   python3 -m bench.gpu --all; cp bench/results/gpu.json $OUT/

The lent machines run an image with Python 3.12, torch, torchvision, transformers, timm, accelerate,
safetensors, tensorboard, pandas, pyarrow and the aiohttp family, but no Ray, diffusers or pydantic,
and reach no package index. Those, with what they need that the image lacks (``PACKAGES``), are
installed here from their wheels for CPython 3.12 manylinux at the versions ``uv.lock`` pins, and packed
into one archive. Ray's Java jar (32 of its wheel's 79 MB), RLlib, Serve and the dashboard's web client,
which this project never loads, are left out so the archive fits the 64 MiB a device call may carry.
``--python-version 3.11 --output /tmp/site-py311.tar.xz`` builds the same pack for this machine's
Python, to check it here; keep it out of ``.devenv``, which a device call carries whole
(docs/performance.md, "On a lent GPU machine").
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from pathlib import Path

from . import common

MODULE = "bench.device_env"
# What the device image lacks, of what this project imports (Ray core, data and train; diffusers;
# pydantic) and of what those need; typing-extensions too, since pydantic needs a newer one than an
# image may hold.
PACKAGES = (
    "ray", "diffusers", "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
    "typing-extensions", "jsonschema", "jsonschema-specifications", "referencing", "rpds-py",
    "tensorboardx", "importlib-metadata",
)
# Parts of the Ray wheel no code path of this project loads.
UNUSED = ("ray/jars", "ray/rllib", "ray/serve", "ray/dashboard/client", "bin", ".lock")
CARRY_LIMIT_MB = 64 * 1.048576  # 64 MiB, for the archive and the working tree together
PLATFORM = "x86_64-manylinux_2_28"  # the image's glibc is newer; every wheel above has a 2_17 build


def locked_versions(names: tuple[str, ...], lock: Path) -> dict[str, str]:
    """``name -> version`` from uv.lock; a name the lock lacks is an error naming it."""
    packages = {p["name"]: p["version"] for p in tomllib.loads(lock.read_text())["package"]}
    missing = [n for n in names if n not in packages]
    if missing:
        raise SystemExit(f"error: {lock}: no locked version of {', '.join(missing)}")
    return {n: packages[n] for n in names}


def install(versions: dict[str, str], target: Path, python_version: str) -> None:
    """The wheels, no dependencies resolved (the list is the closure), for that CPython on x86-64 Linux
    (``uv pip``: this environment has no pip; ``--no-config``: not the project's compile-bytecode)."""
    subprocess.run(["uv", "pip", "install", "-q", "--no-config", "--no-deps", "--only-binary", ":all:",
                    "--python-version", python_version, "--python-platform", PLATFORM,
                    "--target", str(target), *(f"{n}=={v}" for n, v in versions.items())], check=True)


def prune(site: Path) -> float:
    """Remove ``UNUSED``; returns the MB removed."""
    removed = 0
    for rel in UNUSED:
        path = site / rel
        if path.is_file():
            removed += path.stat().st_size
            path.unlink()
        elif path.exists():
            removed += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            shutil.rmtree(path)
    return removed / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=".devenv/site.tar.xz", help="the archive (under an ignored folder)")
    parser.add_argument("--python-version", default="3.12", help="the device image's Python (3.12)")
    args = parser.parse_args(argv)

    versions = locked_versions(PACKAGES, common.ROOT / "uv.lock")
    out = (common.ROOT / args.output).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        print(f"installing {len(versions)} wheels for CPython {args.python_version}: "
              + ", ".join(f"{n} {v}" for n, v in versions.items()), flush=True)
        install(versions, site, args.python_version)
        pruned = prune(site)
        size = sum(f.stat().st_size for f in site.rglob("*") if f.is_file()) / 1e6
        print(f"{size:.0f} MB installed after leaving out {pruned:.0f} MB ({', '.join(UNUSED)}); packing",
              flush=True)
        partial = out.with_name(out.name + ".partial")
        with tarfile.open(partial, "w:xz") as tar:
            tar.add(site, arcname="site")
        partial.replace(out)
    mb = out.stat().st_size / 1e6
    print(f"wrote {out.relative_to(common.ROOT) if out.is_relative_to(common.ROOT) else out}: {mb:.1f} MB "
          f"(a device call carries {CARRY_LIMIT_MB:.1f} MB with the working tree)")
    if mb > CARRY_LIMIT_MB - 5:
        print("error: too large to carry with the working tree; leave more out (UNUSED)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
