"""Ray job entry point: exactly `stablerep-ray eval ...` (same arguments, output and exit code).

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- python jobs/eval.py --checkpoint DIR \
        --data TRAIN[:TEST] [--method knn|linear|both] [--output DIR]

The job runs with the uploaded working directory as its current directory, so relative paths in
the arguments and in the config (e.g. captions.source: data/...) resolve inside that copy. See
docs/cluster.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

COMMAND = "eval"


def _cli_main():
    # Prefer the source tree next to this file (the uploaded working_dir), so the driver runs the
    # code that was submitted, as the job's workers do (Ray puts working_dir first on their
    # PYTHONPATH); fall back to an installed stablerep-ray (e.g. from the cluster image).
    root = Path(__file__).resolve().parent.parent
    if (root / "stablerep_ray" / "__init__.py").is_file() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from stablerep_ray.cli import main

    return main


if __name__ == "__main__":
    sys.exit(_cli_main()([COMMAND, *sys.argv[1:]]))
