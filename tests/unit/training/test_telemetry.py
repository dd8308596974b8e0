"""TensorBoard telemetry: the loss averaged over ranks, hparams the HParams plugin finds in the run, and the
embeddings' spread that tells a collapsed run from a live one."""

import multiprocessing
import socket

import pytest
import torch
from repo import QUICKSTART

from stablerep_ray.config import load_config
from stablerep_ray.training.telemetry import HPARAM_KEYS, DataWait, embedding_spread, rank_mean, write_hparams


def _rank(rank: int, port: int, out) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        out.put((rank, rank_mean({"loss/total": torch.tensor(2.0 + rank), "wait": 0.1 * rank},
                                 torch.device("cpu"), distributed=True)))
    finally:
        dist.destroy_process_group()


def test_rank_mean_averages_every_value_over_ranks():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    ranks = [context.Process(target=_rank, args=(r, port, out)) for r in (0, 1)]
    for p in ranks:
        p.start()
    results = dict(out.get(timeout=60) for _ in ranks)
    for p in ranks:
        p.join(timeout=30)
    assert all(p.exitcode == 0 for p in ranks)
    for rank in (0, 1):  # both ranks see the same means, not their own values
        assert results[rank] == pytest.approx({"loss/total": 2.5, "wait": 0.05})


def test_rank_mean_of_one_rank_is_its_values():
    assert rank_mean({"a": torch.tensor(1.5), "b": 2}, torch.device("cpu"), distributed=False) == {"a": 1.5, "b": 2.0}


def test_hparams_land_in_the_run_directory_itself(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2
    from torch.utils.tensorboard import SummaryWriter

    config = load_config(QUICKSTART, [f"output_dir={tmp_path}"])
    writer = SummaryWriter(tmp_path)
    writer.add_scalar("loss/total", 3.0, 10)
    write_hparams(writer, config, ["loss/total", "eval/knn_top1"])
    writer.close()
    assert [p for p in tmp_path.iterdir() if p.is_dir()] == [], "no timestamped sub-run"

    events = EventAccumulator(str(tmp_path))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    values = start.session_start_info.hparams
    assert set(values) == {*HPARAM_KEYS, "train.peak_lr"}
    assert values["train.objective"].string_value == "stablerep"
    assert values["stream.images_per_group"].number_value == 4
    assert values["train.peak_lr"].number_value == pytest.approx(config.peak_lr)
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in experiment.metric_infos] == ["loss/total", "eval/knn_top1"]


def test_embedding_spread_is_one_for_cancelling_directions_and_zero_for_one_point():
    torch.manual_seed(0)
    assert float(embedding_spread(torch.randn(4096, 64))) == pytest.approx(1.0, abs=0.01)
    assert float(embedding_spread(torch.cat([torch.eye(8), -torch.eye(8)]))) == pytest.approx(1.0)
    # d orthonormal vectors: their mean has length 1/sqrt(d)
    assert float(embedding_spread(torch.eye(16))) == pytest.approx((1 - 1 / 16) ** 0.5)
    one_point = torch.randn(1, 64).repeat(128, 1) * torch.rand(128, 1)  # lengths differ, direction does not
    assert float(embedding_spread(one_point)) < 1e-3
    # nearly collapsed: every row the same direction plus noise of 2 % of its length
    noise = 0.02 * one_point.norm(dim=1, keepdim=True) * torch.randn(128, 64) / 64**0.5
    assert 0.005 < float(embedding_spread(one_point + noise)) < 0.05


def test_data_wait_on_a_cpu_is_the_time_blocked_on_the_stream():
    wait = DataWait(torch.device("cpu"))
    for host in (0.25, 0.5):
        wait.batch_ready(host)
        wait.step_done()
    assert wait.take() == 0.75 and wait.take() == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_data_wait_on_a_gpu_leaves_out_the_time_the_device_was_still_busy():
    import time

    wait, x = DataWait(torch.device("cuda")), torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    wait.step_done()  # the device idles from here ...
    time.sleep(0.2)
    wait.batch_ready(0.2)  # ... until the batch comes: a real wait
    assert wait.take() == pytest.approx(0.2, abs=0.05)
    for _ in range(200):  # a long step still running on the device ...
        x = torch.tanh(x @ x)
    wait.step_done()
    time.sleep(0.01)
    wait.batch_ready(0.01)  # ... while the host blocked on the stream: no wait
    assert wait.take() < 0.005
