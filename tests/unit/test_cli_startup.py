"""The command answers config mistakes and --version at once: nothing heavy is imported first."""

import resource
import subprocess
import sys
from importlib.metadata import version

import pytest
from repo import QUICKSTART, ROOT

# Runs the command in a fresh interpreter, then reports which heavy libraries it imported.
PROBE = """
import sys
from stablerep_ray.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as stop:
    rc = stop.code
print("heavy:", sorted(m for m in ("torch", "ray", "timm", "diffusers") if m in sys.modules))
sys.exit(rc)
"""


def run(*args):
    """The finished process and the CPU seconds it used: on a shared, loaded machine its wall time
    measures the neighbours, its CPU time what the command itself did (~0.25 s here; importing
    torch alone costs ~2 s, above the bound below)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return proc, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


@pytest.mark.parametrize("args,error", [
    (["train", "missing.yaml"], "error: missing.yaml: config file not found"),
    (["train", str(QUICKSTART), "--set", "train.bogus=1"], "error: train.bogus: unknown key"),
    (["tune", str(QUICKSTART), "--set", "stream.images_per_group=1"], "error: stream.images_per_group:"),
])
def test_config_errors_come_before_any_heavy_import(args, error):
    proc, seconds = run(*args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith(error), proc.stderr
    assert "heavy: []" in proc.stdout, proc.stdout
    assert seconds < 1.5, f"{seconds:.1f} CPU s to report a config error"


def test_version_prints_the_installed_package_version():
    proc, seconds = run("--version")
    assert proc.returncode == 0
    assert proc.stdout.splitlines()[0] == f"stablerep-ray {version('stablerep-ray')}"
    assert "heavy: []" in proc.stdout and seconds < 1.5
