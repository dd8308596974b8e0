"""The console lines of `train` and `eval`: what they say, from records shaped as rank 0 sends them."""

from types import SimpleNamespace

import pytest
from repo import QUICKSTART

from stablerep_ray.config import load_config
from stablerep_ray.console import (
    EvalProgress,
    TrainConsole,
    collapse_warning,
    duration,
    eval_summary,
    progress_line,
)


def record(step, start=0, train_s=30.0, knn=None):
    return {
        "step": step, "steps": 200, "start": start, "train_s": train_s,
        "scalars": {"loss/total": 4.1234, "throughput/images_per_s": 311.6,
                    "throughput/data_wait_fraction": 0.034, "stream/groups_admitted": 1600.0},
        "eval": {} if knn is None else {"eval/knn_top1": knn},
    }


@pytest.mark.parametrize("seconds,text", [(0, "0s"), (12.4, "12s"), (100, "1m40s"), (3725, "1h02m")])
def test_duration(seconds, text):
    assert duration(seconds) == text


def test_progress_line_has_rank_mean_loss_throughput_wait_eval_and_eta():
    # 50 steps in 30 s: 150 steps left take 90 s
    assert progress_line(record(50, knn=0.6123)) == (
        "step 50/200  loss 4.123  312 img/s  wait 3%  knn 0.612  eta 1m30s")
    # a resumed run's ETA counts only the steps this attempt ran: 10 steps in 30 s, 90 left
    assert progress_line(record(110, start=100)).endswith("wait 3%  eta 4m30s")
    assert "eta" not in progress_line(record(200))
    two = record(200, knn=0.5)
    two["eval"]["eval/student/knn_top1"] = 0.25  # SynCLR's teacher and student
    assert progress_line(two).endswith("knn 0.500  student/knn 0.250")


def per_set(rec, *prefixes):
    """``rec`` scored on a colour and a shape set: the headline repeats the first set."""
    rec["eval"] = {}
    for i, prefix in enumerate(prefixes):
        color, shape = 0.83 - i / 2, 0.2149 - i / 10
        rec["eval"].update({f"eval/{prefix}knn_top1": color, f"eval/{prefix}knn_top1/color": color,
                            f"eval/{prefix}knn_top1/shape": shape})
    return rec


def test_progress_line_shows_each_eval_set_once():
    assert progress_line(per_set(record(200), "")).endswith("wait 3%  knn color 0.830 shape 0.215")
    assert progress_line(per_set(record(200), "", "student/")).endswith(
        "knn color 0.830 shape 0.215  student/knn color 0.330 shape 0.115")


def test_summary_counts_steps_images_and_says_where_things_went(tmp_path):
    config = load_config(QUICKSTART, [f"output_dir={tmp_path}"])
    console = TrainConsole(config)
    console.records = [record(10, train_s=5.0), record(200, train_s=64.0, knn=0.8375)]
    lines = console.summary(SimpleNamespace(checkpoint=SimpleNamespace(path="/runs/checkpoint_00000200")))
    text = "\n".join(lines)
    assert lines[0].startswith("done: step 200/200 in ") and "1m04s training" in lines[0]
    # 1600 captions x 8 images generated; 200 steps x 128 images consumed in 64 s
    assert "12,800 generated (1,600 captions x 8), 25,600 consumed (200 steps x 128), 400 img/s" in text
    assert "loss 4.123 (mean over 2 workers)" in text and "eval/knn_top1 0.8375" in text
    assert lines[-2:] == ["checkpoint: /runs/checkpoint_00000200",
                          f"tensorboard: tensorboard --logdir {config.run_dir / 'tensorboard'}"]


def test_summary_shows_each_eval_set(tmp_path):
    console = TrainConsole(load_config(QUICKSTART, [f"output_dir={tmp_path}"]))
    console.records = [per_set(record(200, train_s=64.0), "", "student/")]
    final = console.summary(SimpleNamespace(checkpoint=None))[2]
    assert final.endswith("(mean over 2 workers)  eval/knn_top1 color 0.8300 shape 0.2149  "
                          "eval/student/knn_top1 color 0.3300 shape 0.1149")


def collapsing(step, **spreads):
    rec = record(step)
    rec["scalars"].update({f"embed/{name}": value for name, value in spreads.items()})
    return rec


def test_a_collapse_is_said_once_when_it_happens_and_again_in_the_summary(tmp_path, capsys):
    assert collapse_warning([record(10)]) is None  # objectives that report no spread
    assert collapse_warning([collapsing(10, spread=0.4, teacher_spread=0.3)]) is None
    assert collapse_warning([collapsing(20, spread=0.021, teacher_spread=0.3)]).startswith(
        "warning: step 20: the embeddings have collapsed to one point (embed/spread 0.021; 1 = spread out)")
    console = TrainConsole(load_config(QUICKSTART, [f"output_dir={tmp_path}"]))
    for step, spread in ((10, 0.4), (20, 0.021), (30, 0.011), (40, 0.012)):
        console._print(collapsing(step, spread=spread))
    lines = capsys.readouterr().out.splitlines()
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(lines) == 5 and len(warnings) == 1 and lines[2] == warnings[0]  # right after step 20's line
    assert "step 20" in warnings[0] and "docs/learning.md, 'Collapse'" in warnings[0]
    summary = console.summary(SimpleNamespace(checkpoint=None))
    assert summary[3] == warnings[0] and summary[-2] == "checkpoint: none"


def stuck_run(spreads, contrastive, ibot=None):
    """One record per log interval (every 10 steps) of a SynCLR-like run."""
    records = []
    for i, (spread, term) in enumerate(zip(spreads, contrastive, strict=True)):
        rec = collapsing(10 * (i + 1), spread=spread, teacher_spread=0.2)
        rec["scalars"]["loss/contrastive_global"] = term
        if ibot is not None:
            rec["scalars"]["loss/ibot"] = ibot[i]
        records.append(rec)
    return records


def test_a_run_stuck_at_a_flat_loss_with_bunched_embeddings_is_called_stuck():
    # Measured through the pipeline (docs/learning.md): contrastive term 4.843-4.845, spread 0.058-0.09,
    # while the iBOT term still moves.
    stuck = stuck_run([0.09, 0.07, 0.06, 0.058, 0.07], [4.844, 4.845, 4.843, 4.844, 4.844],
                      ibot=[6.9, 6.5, 6.2, 6.0, 5.7])
    assert collapse_warning(stuck) == (
        "warning: step 50: the run is stuck: loss/contrastive_global has stayed at 4.844 since step 10 while "
        "the embeddings sit near one point (embed/spread 0.06-0.09; 1 = spread out): it is not learning "
        "(docs/learning.md, 'Collapse')")
    assert collapse_warning(stuck[:4]) is None  # too few intervals to tell
    # Not stuck: the same flat loss with spread-out embeddings (StableRep's warm-up before it finds shape) ...
    assert collapse_warning(stuck_run([0.15, 0.12, 0.13, 0.2, 0.21], [4.845] * 5)) is None
    # ... one interval with spread-out embeddings, or a loss that moves by more than 0.1 %
    assert collapse_warning(stuck_run([0.09, 0.07, 0.12, 0.058, 0.07], [4.844] * 5)) is None
    assert collapse_warning(stuck_run([0.09] * 5, [4.844, 4.84, 4.83, 4.82, 4.835])) is None


def test_stuck_is_said_once_and_again_in_the_summary(tmp_path, capsys):
    console = TrainConsole(load_config(QUICKSTART, [f"output_dir={tmp_path}"]))
    for rec in stuck_run([0.08] * 8, [4.844] * 8):
        console._print(rec)
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: step 50: the run is stuck")
    assert warnings[0] in console.summary(SimpleNamespace(checkpoint=None))


def test_summary_of_a_run_that_had_nothing_left_to_do(tmp_path):
    console = TrainConsole(load_config(QUICKSTART, [f"output_dir={tmp_path}"]))
    lines = console.summary(SimpleNamespace(checkpoint=None))
    assert lines[0].startswith("done: no training step run") and lines[1] == "checkpoint: none"


def test_eval_summary():
    results = {
        "metrics": {"knn_top1": 0.8375, "linear_top1": 0.9, "linear_C": 100.0}, "knn": {"k": 20, "temperature": 0.07},
        "num_train": 800, "num_test": 800, "num_classes": 8, "test_data": "simulator:color:test",
        "features_via": "in-process", "feature_cache": {"hit": True}, "classifiers_on": "cuda", "seconds": 12.3,
        "output": "/ck/eval",
    }
    assert eval_summary(results) == [
        "eval: knn_top1 0.8375  linear_top1 0.9000  linear_C 100",
        "  800 train / 800 test images, 8 classes (simulator:color:test); kNN k=20, T=0.07; features "
        "in-process, cached; classifiers on cuda; 12s",
        "results: /ck/eval/results.json",
        "tensorboard: tensorboard --logdir /ck/eval",
    ]


def test_ctrl_c_outside_train_and_tune_is_one_line_and_status_130(monkeypatch, capsys):
    """eval, export and the like (and a second Ctrl-C in a sweep): no traceback, the shell's status."""
    from stablerep_ray import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_eval", interrupted)
    assert cli.main(["eval", "--checkpoint", "run/checkpoint_00000010", "--data", "simulator:color"]) == 130
    assert capsys.readouterr().err == "interrupted: stablerep-ray eval stopped before it finished\n"


def test_eval_progress_is_a_line_every_15s_a_stage_with_the_rate_after_start_up(capsys):
    """A stage of a few seconds prints nothing; a long one a line per 15 s, its rate counted from its first
    call (for the features, the first block: the actors' start-up does not stretch the ETA), none once done."""
    now = [100.0]
    progress = EvalProgress(clock=lambda: now[0])
    for t, done in [(130, 1000), (140, 5000), (146, 8000), (160, 15000), (175, 20000)]:
        now[0] = t
        progress("features", done, 20000)
    for t, fits in [(175, 0), (185, 1), (235, 2), (248, 3), (260, 8)]:
        now[0] = t
        progress("linear probe", fits, 8)
    assert capsys.readouterr().out.splitlines() == [
        "features: 8,000/20,000 images  438 img/s  eta 27s",
        "linear probe: 2/8 fits  eta 3m00s",  # 2 fits in 60 s: 6 more take 180 s
    ]
