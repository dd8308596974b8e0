"""Fault tolerance on a real local Ray: a generator actor or a train worker dies mid-run."""

import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from ray._private.state import actors

from stablerep_ray.config import from_dict
from stablerep_ray.storage import latest_checkpoint
from stablerep_ray.tools.simulator import make_captions
from stablerep_ray.training.checkpoint import TRAINER_STATE_FILE, read_resume_chunk
from stablerep_ray.training.trainer import fit

pytestmark = [pytest.mark.usefixtures("local_ray"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]
CAPTIONS = 10  # a tiny source: the 40-step run spans ~16 passes, i.e. ~16 stream chunks



def make_config(tmp_path, name):
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(make_captions(CAPTIONS, seed=3)) + "\n")
    return from_dict({
        "name": name,
        "output_dir": str(tmp_path / "out"),
        "captions": {"source": str(captions)},
        "generator": {"backend": "simulator", "images_per_caption": 2, "output_size": 16,
                      "captions_per_call": 2},
        "stream": {"images_per_group": 2, "log_consumed": True},
        "model": {"name": "vit_tiny_patch16_224", "image_size": 16, "kwargs": {"patch_size": 8, "depth": 1},
                  "head_hidden_dim": 32, "head_layers": 2, "embed_dim": 16},
        "train": {"batch_size": 8, "steps": 40, "num_workers": 2, "warmup_steps": 1, "log_every": 5,
                  "checkpoint_every": 5, "max_failures": 2},
        "cluster": {"num_cpus": 8},
    })


def kill_one(class_fragment: str, after=lambda: True, timeout=240) -> int:
    """SIGKILL the process of one live actor whose class name contains ``class_fragment``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if after():
            pids = [a["Pid"] for a in actors().values()  # the GCS actor table: no dashboard needed
                    if a["State"] == "ALIVE" and class_fragment in a["ActorClassName"] and a["Pid"]]
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                return pids[0]
        time.sleep(0.5)
    raise TimeoutError(f"no live {class_fragment} actor to kill")


def run_with_fault(config, class_fragment, after):
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("fit", fit(config, captions_per_pass=CAPTIONS)))
    thread.start()
    killed = kill_one(class_fragment, after)
    thread.join(timeout=600)
    assert not thread.is_alive(), "the run did not finish after the fault"
    return result["fit"], killed


def served_keys(config) -> Counter:
    served = Counter()
    for path in (config.run_dir / "consumed").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            served.update(json.loads(line)["keys"])
    return served


def assert_planned_range_covered(config, served: Counter) -> None:
    """Every caption of every chunk before the recorded resume point was consumed: no gap.

    Rows past it may be missing at the end of a run: the two workers' split queues keep them a few
    blocks apart in stream order, and rows still queued when training stops are never served.
    """
    resume = read_resume_chunk(config)
    assert resume >= 3, "the run should have gone through several passes of the caption source"
    for chunk in range(resume):
        rows = {key & 0xFFFFFFFF for key in served if key >> 32 == chunk}
        assert rows == set(range(CAPTIONS)), f"chunk {chunk}: missing rows {set(range(CAPTIONS)) - rows}"


def final_state(result):
    return torch.load(Path(result.checkpoint.path) / TRAINER_STATE_FILE, weights_only=False)


def test_killed_generator_actor_is_replaced_and_the_run_finishes(tmp_path):
    config = make_config(tmp_path, "kill-generator")
    consumed = config.run_dir / "consumed"
    result, _ = run_with_fault(config, "GeneratorActor", after=lambda: consumed.exists() and any(consumed.iterdir()))
    assert final_state(result)["step"] == 40
    served = served_keys(config)
    assert max(served.values()) == 1, "pure streaming: no group served twice"
    assert_planned_range_covered(config, served)


def test_killed_train_worker_restores_from_checkpoint_without_gaps(tmp_path):
    config = make_config(tmp_path, "kill-worker")
    result, _ = run_with_fault(config, "RayTrainWorker", after=lambda: latest_checkpoint(config) is not None)
    state = final_state(result)
    assert state["step"] == 40
    logs = sorted(p.name for p in (config.run_dir / "consumed").glob("*.jsonl"))
    assert any("-from00000000-" not in name for name in logs), f"no restart from a checkpoint: {logs}"
    served = served_keys(config)
    assert_planned_range_covered(config, served)
    repeated = sum(n - 1 for n in served.values())
    # bounded: what was consumed past the checkpoint's resume chunk, far from a restart from scratch
    assert repeated < sum(served.values()) / 2, repeated
