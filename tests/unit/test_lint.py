"""The codebase's own habits, checked: ruff is clean, and no package module grows past ~500 lines."""

from __future__ import annotations

import subprocess
import sys

from repo import ROOT

MAX_MODULE_LINES = 520


def test_ruff_is_clean():
    run = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_no_package_module_over_about_500_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in (ROOT / "stablerep_ray").rglob("*.py")}
    assert not {p: n for p, n in sizes.items() if n > MAX_MODULE_LINES}
