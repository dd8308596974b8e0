"""stablerep-ray: StableRep on a stream of synthetic images, as one Ray program.

captions -> generation (Ray Data actor pool) -> stream (replay buffer) -> train (Ray Train DDP,
multi-positive loss) -> evaluation (kNN, linear probe) -> tuning (Ray Tune).
"""

import os

# Under `uv run`, Ray would otherwise ship the working directory to every worker and build a fresh
# virtual environment there (minutes, GBs of CUDA wheels). Local workers already share this Python;
# clusters install the project in their image (cluster.yaml). Set to 1 to opt back in.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

__version__ = "0.1.0"
