"""The streaming spine on a real local Ray: generator actor pools -> streaming_split -> workers."""

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from repo import CONFIGS

from stablerep_ray.config import from_dict
from stablerep_ray.generation.stage import build_image_stream

pytestmark = [pytest.mark.usefixtures("local_ray"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/


def write_captions(path: Path, num: int) -> Path:
    from stablerep_ray.tools.simulator import make_captions

    path.write_text("\n".join(make_captions(num, seed=1)) + "\n")
    return path


def base_config(tmp_path, **sections):
    config = {
        "name": "spine",
        "output_dir": str(tmp_path / "out"),
        "captions": {"source": str(write_captions(tmp_path / "captions.txt", 400))},
        "generator": {"backend": "simulator", "images_per_caption": 4, "output_size": 16,
                      "captions_per_call": 4, "guidance_scale": 4.0},
        "stream": {"images_per_group": 2},
        "model": {"name": "vit_tiny_patch16_224", "image_size": 16, "kwargs": {"patch_size": 8, "depth": 1},
                  "head_hidden_dim": 32, "head_layers": 2, "embed_dim": 16},
        "train": {"batch_size": 16, "steps": 6, "num_workers": 2, "warmup_steps": 1, "log_every": 2,
                  "checkpoint_every": 2},
        "cluster": {"num_cpus": 8},
    }
    for section, values in sections.items():
        config[section].update(values)
    return from_dict(config)


def collect(ds) -> dict[int, np.ndarray]:
    """Images by source position (what seeds them; a repeated text has one caption id)."""
    return {int(p): imgs for b in ds.iter_batches(batch_size=None)
            for p, imgs in zip(b["position"], b["images"], strict=True)}


def test_a_ray_worker_paces_ray_datas_executor_once_it_imports_it():
    """The worker set-up hook (process_setup.WORKER_SETUP) reaches Ray's workers: Ray Data's scheduling
    loop, imported after the hook ran, is the paced one (where Train's split coordinator runs it)."""
    @ray.remote
    def executor_pass() -> str:
        from ray.data._internal.execution import streaming_executor

        return streaming_executor.process_completed_tasks.__qualname__

    assert ray.get(executor_pass.remote()) == "_pace.<locals>.paced"


def test_captions_reach_the_generators_in_stream_order(tmp_path):
    """A caption file is read pass after pass, each in file order (a curriculum such as the spatial
    quickstart's warm-up relies on it): 100 steps of 8 captions from a 400-caption file are 3 passes
    and a part, which Ray Data would read and repartition concurrently, interleaved, unless told to
    keep the order."""
    config = base_config(tmp_path, train={"steps": 100}, captions={"repeat": True})
    order = [(int(c), int(r)) for b in build_image_stream(config).iter_batches(batch_size=None)
             for c, r in zip(b["chunk"], b["row"], strict=True)]
    assert len({chunk for chunk, _ in order}) >= 3
    assert order == sorted(order), "captions out of stream order"
    unordered = base_config(tmp_path, train={"steps": 100}, captions={"repeat": True}, stream={"keep_order": False})
    assert not build_image_stream(unordered).context.execution_options.preserve_order


def test_diffusers_pool_regenerates_identical_images(tmp_path):
    """Same source position, index and seed -> identical images from two separate actor pools."""
    from stablerep_ray.tools.tiny_pipeline import make_tiny_pipeline

    model = make_tiny_pipeline(tmp_path / "tiny-sd", sample_size=8)
    captions = write_captions(tmp_path / "c.txt", 6)

    def run(seed, per_call):
        config = from_dict({
            "captions": {"source": str(captions), "repeat": False},
            "generator": {"model": str(model), "steps": 2, "resolution": 32, "output_size": 16,
                          "images_per_caption": 3, "captions_per_call": per_call, "seed": seed},
            "stream": {"images_per_group": 2},
            "train": {"batch_size": 4, "num_workers": 2},
        })
        return collect(build_image_stream(config))

    first, second, reshaped, other_seed = run(0, 2), run(0, 2), run(0, 3), run(1, 2)
    assert sorted(first) == sorted(second) and len(first) == 6
    for cid, images in first.items():
        assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8
        np.testing.assert_array_equal(images, second[cid])
        # batch composition does not change an image beyond float noise of a different batch size
        assert np.abs(images.astype(int) - reshaped[cid].astype(int)).max() <= 2
        assert not np.array_equal(images[0], images[1]), "different indices, different images"
        assert not np.array_equal(images, other_seed[cid]), "a different base seed renders anew"


def consumption_loop(loop_config):
    """Drive the real worker-side stream on a real shard and record what each batch held."""
    import ray.train

    from stablerep_ray.stream.replay import GroupStream

    config = from_dict(loop_config["config"])
    rank = ray.train.get_context().get_world_rank()
    shard = ray.train.get_dataset_shard("train")
    stream = GroupStream(shard.iter_batches(batch_size=None, batch_format="numpy"),
                         captions_per_step=config.captions_per_worker_step,
                         images_per_group=config.images_drawn_per_group, reuse=config.stream.reuse,
                         buffer_groups=config.buffer_groups, seed=rank)
    batches = []
    for _ in range(config.train.steps):
        batch = stream.next_batch()
        labels = batch.caption_ids.reshape(len(batch.keys), -1)
        assert (labels == labels[:, :1]).all()
        batches.append({"keys": batch.keys.tolist(), "labels": labels[:, 0].tolist()})
    record = {"batches": batches, "peak": stream.buffer.peak_bytes, "admitted": stream.admitted}
    Path(loop_config["out"], f"rank{rank}.json").write_text(json.dumps(record))


@pytest.mark.parametrize("reuse", [1, 3])
def test_groups_stay_whole_and_are_served_at_most_r_times(tmp_path, reuse):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = base_config(tmp_path, stream={"reuse": reuse}, train={"steps": 12})
    cap = config.buffer_groups * config.group_bytes  # the auto buffer
    TorchTrainer(
        consumption_loop,
        train_loop_config={"config": config.model_dump(mode="json"), "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2),
        run_config=RunConfig(name="consume", storage_path=str(tmp_path / "storage")),
        datasets={"train": build_image_stream(config, captions_per_pass=400)},
    ).fit()
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    served, owner = Counter(), {}
    for rank, record in enumerate(records):
        assert len(record["batches"]) == 12
        assert record["peak"] <= cap
        for batch in record["batches"]:
            assert len(set(batch["keys"])) == len(batch["keys"]) == config.captions_per_worker_step
            served.update(batch["keys"])
            for key in batch["keys"]:
                assert owner.setdefault(key, rank) == rank, "a group never reaches two workers"
    assert max(served.values()) <= reuse
    if reuse == 1:
        assert set(served.values()) == {1}
        assert len(served) == 2 * 12 * config.captions_per_worker_step
        assert sum(r["admitted"] for r in records) == len(served)
    else:
        # admitted groups were served, or still wait in a worker's buffer (draws are uniform over it)
        assert sum(r["admitted"] for r in records) <= len(served) + 2 * config.buffer_groups
        assert sum(served.values()) > sum(r["admitted"] for r in records), "groups were reused"


def test_resume_continues_at_the_saved_step_with_the_optimizer_state(tmp_path):
    from stablerep_ray.training.checkpoint import TRAINER_STATE_FILE, read_resume_chunk
    from stablerep_ray.training.trainer import fit

    config = base_config(tmp_path)
    first = fit(config, max_steps=4, captions_per_pass=400)
    saved = torch.load(Path(first.checkpoint.path) / TRAINER_STATE_FILE, weights_only=False)
    assert saved["step"] == 4
    assert read_resume_chunk(config) == saved["resume_chunk"]
    # A checkpoint whose write was cut short (a crash mid-upload): a directory Train never recorded,
    # with a truncated model file. The resume must ignore it and start from the committed step 4.
    torn = Path(first.checkpoint.path).parent / "checkpoint_00000005"
    torn.mkdir()
    (torn / "model.pt").write_bytes((Path(first.checkpoint.path) / "model.pt").read_bytes()[:100])
    assert read_resume_chunk(config) == saved["resume_chunk"]

    second = fit(config, captions_per_pass=400)
    final = torch.load(Path(second.checkpoint.path) / TRAINER_STATE_FILE, weights_only=False)
    assert final["step"] == 6
    assert final["scheduler"]["last_epoch"] == 6
    adam_steps = {float(s["step"]) for s in final["optimizer"]["state"].values()}
    assert adam_steps == {6.0}, "AdamW moments continued from the checkpoint, not from scratch"
    # rows served again because of the resume: what the step-4 checkpoint said a resume would repeat;
    # the first run never resumed, so it repeated nothing
    assert first.metrics["stream/rows_repeated_on_resume"] == 0
    assert second.metrics["stream/rows_repeated_on_resume"] == saved["rows_to_repeat"] > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(config.run_dir / "tensorboard"))
    events.Reload()
    steps = [e.step for e in events.Scalars("loss/total")]
    assert steps == sorted(set(steps)) and steps[-1] == 6  # step N: the model after N steps
    assert events.Images("samples/caption_groups")


def test_paper_stream_shape_rehearsal(tmp_path):
    """The paper config with only its sizes scaled down: K = 43 captions per worker step, n = 10,
    m = 6, R = 15 and the auto replay buffer; the simulator, a one-block ViT on 16 px images. It fills
    its buffer, then serves groups at steps spread across the buffer, never more than R times."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from stablerep_ray.config import load_config
    from stablerep_ray.training.trainer import fit

    steps = 45
    config = load_config(CONFIGS / "paper-vitb16-sd15.yaml", [
        f"output_dir={tmp_path}", f"captions.source={write_captions(tmp_path / 'captions.txt', 5000)}",
        "generator.backend=simulator", "generator.output_size=16", "generator.num_actors=2",
        "generator.num_gpus_per_actor=0", "generator.num_cpus_per_actor=1", "generator.captions_per_call=64",
        "generator.label_selector={}", "train.label_selector={}", "train.use_gpu=false", "train.num_workers=2",
        "train.num_cpus_per_worker=2", "train.batch_size=516", f"train.steps={steps}", "train.warmup_steps=5",
        f"train.checkpoint_every={steps}", "train.log_every=5", "train.max_failures=0", "train.precision=fp32",
        "model.name=vit_tiny_patch16_224", "model.image_size=16", "model.kwargs={patch_size: 8, depth: 1}",
        "model.head_hidden_dim=32", "model.embed_dim=16", "stream.buffer_mb=0", "stream.log_consumed=true",
        "eval.data=", "cluster.storage_path=", "cluster.num_cpus=8",
    ])
    k, reuse, buffer = config.captions_per_worker_step, config.stream.reuse, config.buffer_groups
    assert (k, reuse, config.stream.images_per_group, config.generator.images_per_caption) == (43, 15, 6, 10)
    assert config.peak_lr == pytest.approx(2e-4 * 516 / 256 / 2)
    fit(config, captions_per_pass=5000)

    served, batches = Counter(), {0: [], 1: []}
    for log in sorted((config.run_dir / "consumed").glob("rank*.jsonl")):
        rank = int(log.name[4])
        for line in log.read_text().splitlines():
            keys = json.loads(line)["keys"]
            batches[rank].append(set(keys))
            served.update(keys)
    assert len(batches[0]) == len(batches[1]) == steps
    assert max(served.values()) <= reuse, "no group served more than R times"
    full = buffer // k + 1  # the buffer fills within about buffer / (K (1 - 1/R)) steps
    for rank_batches in batches.values():
        steady = rank_batches[full:]
        overlaps = [len(a & b) / k for a, b in zip(steady, steady[1:], strict=False)]
        assert max(overlaps) <= 2 / reuse, "consecutive batches share few captions"

    events = EventAccumulator(str(config.run_dir / "tensorboard"))
    events.Reload()
    last = {tag: events.Scalars(tag)[-1].value for tag in ("stream/buffer_fill", "stream/steps_between_serves")}
    assert last["stream/buffer_fill"] > 0.9
    # A gap is geometric with mean buffer / K (30 steps), cut short by the run's 45; a queue gives 1.
    assert last["stream/steps_between_serves"] >= buffer / k / 3
    # ~K/R fresh groups a step needs the first groups to reach R serves (~R x buffer / K steps):
    # tests/unit/stream/test_replay.py runs the same stream that long.


def test_default_config_fits_its_buffer():
    """All defaults (batch 8256, 2 workers, n = 10, 256 px): the auto buffer holds one step's groups."""
    config = from_dict({"captions": {"source": "captions.txt"}, "generator": {"model": "some/model"}})
    assert config.buffer_groups >= config.captions_per_worker_step == 688
