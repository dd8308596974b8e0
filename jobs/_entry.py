"""Shared body of the job entry points: run one `stablerep-ray` subcommand with the job's argv.

The job runs with the uploaded working directory as its current directory, so relative paths in
the arguments and in the config (e.g. captions.source: data/...) resolve inside that copy. The
source tree next to this file (the uploaded working_dir) is preferred over an installed
stablerep-ray, so the driver runs the code that was submitted, as the job's workers do (Ray puts
working_dir first on their PYTHONPATH). See docs/cluster.md.
"""

from __future__ import annotations

import sys
from pathlib import Path


def run(command: str) -> None:
    root = Path(__file__).resolve().parent.parent
    if (root / "stablerep_ray" / "__init__.py").is_file() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from stablerep_ray.cli import main

    sys.exit(main([command, *sys.argv[1:]]))
