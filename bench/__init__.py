"""Benchmarks for stablerep-ray: ``uv run python -m bench.<name> --help``.

Each benchmark measures the figures it compares in ONE run (so machine load affects both sides),
prints them with the exact command, and writes a JSON to ``bench/results/`` (gitignored), which
``stablerep-ray plan`` can read back as a measured rate table. See docs/performance.md.
"""
