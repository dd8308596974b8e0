"""SynCLR's parts against independent float64 references: the teacher's EMA and momentum schedule,
Sinkhorn-Knopp centring, the masked-patch loss, the contrastive term's positives, the 2-process gloo
gradient, and an exact resume of the teacher and every schedule."""

from __future__ import annotations

import datetime
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from repo import QUICKSTART

from stablerep_ray.augment import Crops, random_patch_masks
from stablerep_ray.config import load_config
from stablerep_ray.losses import masked_patch_loss, sinkhorn_knopp, teacher_multi_positive_loss
from stablerep_ray.training.objectives.synclr import SynCLRInputs, teacher_momentum, teacher_temperature
from stablerep_ray.training.step import TrainStep, synthetic_batch

TINY = ["train.objective=synclr", "model.image_size=16", "model.kwargs.depth=1", "model.head_hidden_dim=32",
        "model.embed_dim=16", "train.batch_size=32", "synclr.local_size=8", "synclr.local_crops=2",
        "synclr.prototypes=16", "synclr.ibot_hidden_dim=32", "synclr.ibot_bottleneck_dim=8",
        "synclr.predictor_hidden_dim=32", "synclr.teacher_temperature_warmup_steps=3", "train.steps=10",
        "train.temperature=0.08"]
WORLD = 2


def _config(*overrides):
    return load_config(QUICKSTART, [*TINY, *overrides])


def _step(config, seed=0):
    torch.manual_seed(seed)
    return TrainStep.build(config, torch.device("cpu"), seed=seed)


# -- schedules and the EMA ------------------------------------------------------------------------------
def test_momentum_is_a_half_cosine_from_start_to_end():
    values = [teacher_momentum(i, 100, 0.994, 1.0) for i in range(101)]
    assert values[0] == pytest.approx(0.994) and values[-1] == pytest.approx(1.0)
    assert values[50] == pytest.approx(0.997)
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert teacher_momentum(25, 100, 0.9, 1.0) == pytest.approx(1 - 0.1 * (1 + math.cos(math.pi / 4)) / 2)


def test_teacher_temperature_warms_up_linearly_then_stays():
    assert [teacher_temperature(i, 4, 0.04, 0.07) for i in (0, 2, 4, 9)] == pytest.approx([0.04, 0.055, 0.07, 0.07])
    assert teacher_temperature(0, 0, 0.04, 0.07) == 0.07


def test_ema_update_matches_float64_reference():
    step = _step(_config())
    teacher = step.objective.teacher
    assert all(not p.requires_grad for p in teacher.parameters())
    before = {k: v.double().clone() for k, v in teacher.state_dict().items()}
    step(synthetic_batch(step.config, step.config.captions_per_worker_step))
    m = teacher_momentum(0, 10, 0.994, 1.0)
    student = {k: v.double() for k, v in step.model.state_dict().items()}
    for name, value in teacher.state_dict().items():
        expected = m * before[name] + (1 - m) * student[name]
        torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-7, msg=name)
    assert any(not torch.equal(before[k].float(), v) for k, v in teacher.state_dict().items())


# -- Sinkhorn-Knopp and the masked-patch loss ------------------------------------------------------------
def _sinkhorn_reference(logits: np.ndarray, temperature: float, iterations: int) -> np.ndarray:
    """Alternate scaling of P = exp(logits / T): prototypes to equal mass, then patches to mass 1."""
    p = np.exp(logits / temperature)
    p /= p.sum()
    m, k = p.shape
    for _ in range(iterations):
        p /= p.sum(axis=0, keepdims=True) * k
        p /= p.sum(axis=1, keepdims=True) * m
    return p * m


@pytest.mark.parametrize("iterations", [1, 3])
def test_sinkhorn_matches_reference_and_rows_sum_to_one(iterations):
    logits = torch.rand(12, 5, generator=torch.Generator().manual_seed(0)) * 2 - 1
    targets = sinkhorn_knopp(logits, 0.05, iterations)
    expected = _sinkhorn_reference(logits.double().numpy(), 0.05, iterations)
    np.testing.assert_allclose(targets.double().numpy(), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(targets.sum(1).numpy(), np.ones(12), rtol=1e-5)


def test_sinkhorn_converges_to_equal_prototype_use():
    logits = torch.rand(20, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1
    targets = sinkhorn_knopp(logits, 0.1, iterations=200)
    np.testing.assert_allclose(targets.sum(0).numpy(), np.full(4, 20 / 4), rtol=1e-4)
    np.testing.assert_allclose(targets.sum(1).numpy(), np.ones(20), rtol=1e-5)


def test_masked_patch_loss_on_hand_built_tokens():
    # Image 7 has two masked patches, image 3 one: per-image means, then the mean over images.
    student = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]], dtype=torch.float64)
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    images = torch.tensor([7, 7, 3])
    tau = 0.5
    log_p = [[x / tau - math.log(sum(math.exp(v / tau) for v in row)) for x in row] for row in student.tolist()]
    ce = [-sum(t * lp for t, lp in zip(trow, lrow)) for trow, lrow in zip(targets.tolist(), log_p)]
    expected = ((ce[0] + ce[1]) / 2 + ce[2]) / 2
    assert masked_patch_loss(student, targets, images, tau).item() == pytest.approx(expected, rel=1e-6)


def test_random_patch_masks_mask_a_fixed_share_of_the_crops_at_the_ratio():
    g = torch.Generator().manual_seed(0)
    mask = random_patch_masks(400, 16, 0.5, 0.25, g)
    per_crop = mask.sum(1)
    assert set(per_crop.tolist()) == {0, 4}
    assert (per_crop > 0).sum() == 200
    # 1.5 crops of 3: one or two, each about half the time, chosen at random
    counts = [random_patch_masks(3, 16, 0.5, 0.25, g).any(1) for _ in range(400)]
    assert {int(c.sum()) for c in counts} == {1, 2}
    assert 0.4 < np.mean([c.sum().item() == 2 for c in counts]) < 0.6
    assert 0.4 < torch.stack(counts).float().mean().item() < 0.6


# -- the contrastive term ----------------------------------------------------------------------------
def _contrastive_reference(q, q_labels, q_images, k, k_labels, k_images, tau):
    """Per anchor: -mean over positives of log softmax over the keys not of its own image."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    k = k / np.linalg.norm(k, axis=1, keepdims=True)
    losses = []
    for i in range(len(q)):
        allowed = [j for j in range(len(k)) if k_images[j] != q_images[i]]
        positives = [j for j in allowed if k_labels[j] == q_labels[i]]
        if not positives:
            continue
        logits = np.array([q[i] @ k[j] / tau for j in allowed])
        log_z = np.log(np.exp(logits - logits.max()).sum()) + logits.max()
        losses.append(-np.mean([q[i] @ k[j] / tau - log_z for j in positives]))
    return float(np.mean(losses)) if losses else 0.0


def test_contrastive_positives_are_other_images_of_the_caption():
    rng = np.random.default_rng(0)
    k_labels, k_images = np.array([0, 0, 1, 1, 2]), np.arange(5)  # teacher: one global crop per image
    q_labels, q_images = np.tile(k_labels, 2), np.tile(k_images, 2)  # student: two local crops per image
    q, k = rng.normal(size=(10, 6)), rng.normal(size=(5, 6))
    got = teacher_multi_positive_loss(*(torch.from_numpy(a) for a in (q, q_labels, q_images, k, k_labels, k_images)),
                                      temperature=0.08)
    assert got.item() == pytest.approx(_contrastive_reference(q, q_labels, q_images, k, k_labels, k_images, 0.08),
                                       rel=1e-6)
    # A crop whose caption has no other image has no positive: its own image never counts.
    alone = teacher_multi_positive_loss(*(torch.from_numpy(a) for a in (q, np.arange(10) % 5, q_images, k,
                                                                         np.arange(5), k_images)))
    assert alone.item() == 0.0
    # Without query images (local crops, as the authors' code), the crop's own image is a positive too.
    mine = teacher_multi_positive_loss(torch.from_numpy(q), torch.from_numpy(q_labels), None, torch.from_numpy(k),
                                       torch.from_numpy(k_labels), torch.from_numpy(k_images), temperature=0.08)
    nobody = np.full(10, -1)
    assert mine.item() == pytest.approx(_contrastive_reference(q, q_labels, nobody, k, k_labels, k_images, 0.08),
                                        rel=1e-6)


@pytest.mark.parametrize("own_image", [True, False])
def test_local_crops_match_their_own_image_unless_told_not_to(monkeypatch, own_image):
    import stablerep_ray.losses as losses

    calls = []

    def spy(queries, labels, query_images, keys, key_labels, key_images, *args, **kwargs):
        calls.append((query_images, key_images))
        return teacher_multi_positive_loss(queries, labels, query_images, keys, key_labels, key_images, *args,
                                           **kwargs)

    monkeypatch.setattr(losses, "teacher_multi_positive_loss", spy)
    step = _step(_config(f"synclr.local_matches_own_image={own_image}", "synclr.global_crops=2"))
    step(synthetic_batch(step.config, step.config.captions_per_worker_step))
    (global_queries, global_keys), (local_queries, local_keys) = calls
    # Each global crop leaves out only its own view: its image's other global crop is a positive.
    assert global_queries.tolist() == global_keys.tolist() == list(range(len(global_keys)))
    if own_image:
        assert local_queries is None
    else:  # every global crop of the local crop's image is left out
        images = len(global_keys) // 2
        assert local_keys.tolist() == list(range(images)) * 2
        assert local_queries.tolist() == list(range(images)) * 2  # synclr.local_crops=2


def test_local_crops_move_towards_teacher_global_crops_of_their_caption():
    torch.manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    labels, images = torch.tensor([0, 0, 1, 1]), torch.arange(4)
    query = torch.randn(1, 8, requires_grad=True)
    teacher_multi_positive_loss(query, torch.tensor([0]), torch.tensor([0]), keys, labels, images).backward()
    moved = torch.nn.functional.normalize(query.detach() - 0.1 * query.grad, dim=1)
    before = torch.nn.functional.normalize(query.detach(), dim=1)
    assert (moved @ keys[1]) > (before @ keys[1])  # the other image of caption 0


# -- two processes over gloo ---------------------------------------------------------------------------
def _inputs(config, images, rank=None):
    """The SynCLR inputs of a fixed batch of 8 images (2 per caption), or of one rank's half of it."""
    g = torch.Generator().manual_seed(5)
    n, s, ls, local = 8, config.model.image_size, config.synclr.local_size, config.synclr.local_crops
    glob, loc = torch.randn(n, 3, s, s, generator=g), torch.randn(local, n, 3, ls, ls, generator=g)
    mask = random_patch_masks(n, images, 1.0, 0.5, g)
    captions = torch.arange(n) // 2 * 3 + 11  # pairs: 11, 11, 14, 14, ...
    keep = slice(None) if rank is None else slice(rank * n // WORLD, (rank + 1) * n // WORLD)
    kept = len(captions[keep])
    crops = Crops(glob[keep], loc[:, keep].reshape(local * kept, 3, ls, ls))
    return SynCLRInputs(crops, mask[keep], torch.arange(kept), captions[keep]), captions[keep]


def _loss_and_grads(rank=None):
    config = _config("synclr.mask_probability=1.0", "synclr.teacher_momentum=[0.5,1.0]")
    step = _step(config, seed=3)
    with torch.no_grad():  # a teacher that differs from the student
        for p in step.objective.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    inputs, labels = _inputs(config, step.objective.patches, rank)
    loss, metrics = step.objective.loss(step.model, step.model, inputs, labels, None)
    loss.backward()
    return loss.detach(), {k: v.grad.clone() for k, v in step.model.named_parameters() if v.grad is not None}


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.save(_loss_and_grads(rank), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_gradient_equals_single_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    loss, grads = _loss_and_grads()
    torch.testing.assert_close(torch.stack([r[0] for r in ranks]).mean(), loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ranks[0][1].keys() and "mask_token" in grads
    for name, grad in grads.items():  # DDP averages the ranks' gradients; fp32 sums in another order
        scale = grad.abs().max().item()
        torch.testing.assert_close(sum(r[1][name] for r in ranks) / WORLD, grad, rtol=1e-4, atol=1e-5 * scale,
                                   msg=name)


def test_every_rank_starts_from_the_same_teacher():
    """DDP broadcasts rank 0's student, not the teacher copied from it: the ranks must build alike."""
    from stablerep_ray.training.loop import build_step

    config = _config()
    steps, draws = [], []
    for rank in range(2):
        steps.append(build_step(config, torch.device("cpu"), rank, distributed=False))
        draws.append(torch.rand(4))
    for a, b in zip(*(s.objective.teacher.state_dict().values() for s in steps), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(*draws), "the global generator is seeded per rank afterwards"


# -- resume ------------------------------------------------------------------------------------------
def test_resume_continues_teacher_and_schedules_exactly(tmp_path):
    from stablerep_ray.models.io import MODEL_FILE, save_model

    config = _config()
    batches = [synthetic_batch(config, config.captions_per_worker_step, seed=i) for i in range(5)]
    straight = _step(config)
    for batch in batches:
        straight(batch)

    first = _step(config)
    for batch in batches[:3]:
        first(batch)
    objective = first.objective
    save_model(first.model, config, tmp_path, weights=objective.extra_weights(), eval_weights=objective.eval_weights,
               **objective.model_kwargs())
    state = first.state_dict()
    generator_state = first.generator.get_state()

    resumed = _step(config, seed=99)  # different init: everything must come from the checkpoint
    saved = torch.load(tmp_path / MODEL_FILE, weights_only=False)
    resumed.model.load_state_dict(saved["model"])
    for name, module in resumed.objective.extra_weights().items():
        module.load_state_dict(saved["weights"][name])
    resumed.load_state_dict(state)
    resumed.generator.set_state(generator_state)
    assert resumed.objective.steps_done == 3
    for batch in batches[3:]:
        result = resumed(batch)
    for a, b in zip(straight.objective.teacher.state_dict().values(), resumed.objective.teacher.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert resumed.objective.steps_done == straight.objective.steps_done == 5
    assert float(result.metrics["synclr/teacher_momentum"]) == pytest.approx(teacher_momentum(4, 10, 0.994, 1.0))
    assert float(result.metrics["synclr/teacher_temperature"]) == pytest.approx(teacher_temperature(4, 3, 0.04, 0.07))


def test_checkpoint_evaluates_the_teacher_by_default(tmp_path):
    from stablerep_ray.models.io import load_model, save_model

    step = _step(_config())
    step(synthetic_batch(step.config, step.config.captions_per_worker_step))
    objective = step.objective
    save_model(step.model, step.config, tmp_path, weights=objective.extra_weights(),
               eval_weights=objective.eval_weights, **objective.model_kwargs())
    teacher, _ = load_model(tmp_path)
    student, _ = load_model(tmp_path, "model")
    for name, value in teacher.state_dict().items():
        torch.testing.assert_close(value, objective.teacher.state_dict()[name])
    assert any(not torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), student.state_dict().values()))


def test_online_eval_probes_teacher_and_student_on_every_set():
    from stablerep_ray.evaluation import OnlineKNN
    from stablerep_ray.training.loop import online_eval

    config = _config("eval.data=[simulator:color:2, simulator:shape:2]", "eval.knn_k=3")
    step = _step(config)
    step(synthetic_batch(config, config.captions_per_worker_step))
    evaluator = OnlineKNN(config)
    scores = online_eval(evaluator, step, "cpu")
    teacher, student = (evaluator.evaluate(m, "cpu") for m in (step.objective.teacher, step.model))
    sets = ("", "/color", "/shape")
    assert set(scores) == {f"eval/{who}knn_top1{which}" for who in ("", "student/") for which in sets}
    for which in sets:
        assert scores[f"eval/knn_top1{which}"] == teacher[f"eval/knn_top1{which}"]
        assert scores[f"eval/student/knn_top1{which}"] == student[f"eval/knn_top1{which}"]


def test_weight_decay_follows_its_cosine_on_the_decayed_group_only():
    from stablerep_ray.training.optim import weight_decay_at

    config = _config("train.weight_decay=0.04", "train.weight_decay_end=0.2")
    assert [weight_decay_at(i, config) for i in (0, 5, 10)] == pytest.approx([0.04, 0.12, 0.2])
    step = _step(config)
    for i in range(3):
        step(synthetic_batch(config, config.captions_per_worker_step, seed=i))
    decayed, plain = step.optimizer.param_groups
    assert decayed["weight_decay"] == pytest.approx(weight_decay_at(2, config)) and plain["weight_decay"] == 0.0


def test_planner_counts_the_teacher_and_local_crops():
    from repo import CONFIGS

    from stablerep_ray.tools.planner.costs import VIT_B16_TRAIN_TFLOP, trainer_tflop

    config = load_config(CONFIGS / "synclr-vitb16.yaml")
    # ViT-B/16: 197 tokens per 224 px crop, 37 per 96 px local crop; the teacher forward is 1/3 of a step.
    assert trainer_tflop(config) == pytest.approx(VIT_B16_TRAIN_TFLOP * (1 + 1 / 3 + 4 * 37 / 197))


def test_synclr_sweep_plans_the_stablerep_sweep_trials(tmp_path):
    from repo import CONFIGS

    from stablerep_ray.sweep.plan import SEED, plan_sweep

    synclr = plan_sweep(load_config(CONFIGS / "sweep-synclr-quickstart.yaml"))
    stablerep = plan_sweep(load_config(CONFIGS / "sweep-quickstart.yaml"))
    assert synclr.points == stablerep.points and synclr.steps == stablerep.steps
    for point in synclr.points:
        trial = synclr.trial_config({**point, SEED: 0}, tmp_path / "trial")
        assert trial.train.objective == "synclr" and trial.train.batch_size == stablerep.config.train.batch_size
        assert trial.stream.images_per_group == point["stream.images_per_group"]


@pytest.mark.parametrize("variant", [["synclr.local_crops=0"], ["synclr.ibot_weight=0"],
                                     ["synclr.local_crops=0", "synclr.ibot_weight=0"],
                                     ["synclr.global_crops=2", "train.batch_size=64"]])
def test_every_term_can_be_switched_off_or_scaled(variant):
    config = _config(*variant)
    step = _step(config)
    result = step(synthetic_batch(config, config.captions_per_worker_step))
    assert torch.isfinite(result.loss)
    assert ("loss/contrastive_local" in result.metrics) == (config.synclr.local_crops > 0)
    assert ("loss/ibot" in result.metrics) == (config.synclr.ibot_weight > 0)
    assert (step.model.patch_head is None) == (config.synclr.ibot_weight == 0)
    assert len(result.labels) == config.captions_per_worker_step * config.group_size
