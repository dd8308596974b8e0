"""Split a GPU budget between generator actors and trainer workers (``stablerep-ray plan``).

Units: rates are images/s *per device* (per GPU; per actor / per worker for CPU-only configs).
The stream turns them into captions/s:

* a trainer worker at full speed trains ``t`` images/s, i.e. ``t / (g * R)`` NEW captions/s, where
  ``g`` = encoder inputs per caption in a batch (``stream.images_per_group`` m, or 2 for SimCLR) and
  ``R`` = ``stream.reuse`` (each caption group is served R times before eviction);
* a generator device makes ``s`` images/s, i.e. ``s / n`` captions/s (``n`` = images per caption).

So one trainer device needs ``k = t * n / (s * g * R)`` generator devices. With both sides at the same
fraction of peak, ``t / s = F(S) / 0.105`` (the cost model: one SD image with classifier-free
guidance costs ``F(S) = 1.61 S + 2.5`` TFLOP, one ViT-B/16 training view 0.105 TFLOP), and with
``n = m``: ``k = F(S) / (0.105 R)``, about 37 at 20 steps and R = 9.

The trainer waits for data a fraction ``max(0, 1 - supply / demand)`` of the time; the plan is the
split of the budget with the highest trained images/s among those keeping that wait under 5 %.

Rates come from, in this order: a measurement on this machine (``measure=True``; saved to
``bench/results/planner-rates.json`` and reused for the same config and device), the GPU benchmark's
table (``bench/results/gpu.json``, written by ``python -m bench.gpu``), or an ESTIMATE from the
cost model's FLOP counts at an assumed fraction of the GPU's bf16 peak (SD-1.x/2.x-architecture
generators and timm ViT trainers only).

Modules: ``costs`` (the cost model, GPU peaks, the estimate and the benchmark table), ``measure``
(rates measured here with the one training step, saved and reused; :func:`rates_for`), ``split``
(the split, its warnings and the ``plan`` report), ``captions`` (the caption-synthesis stage in front of
the generators: its measured rate, the devices it holds, its bottleneck warning). This package re-exports
what callers use.
"""

from __future__ import annotations

from .captions import CaptionRate, caption_rate, check_caption_supply, consumed_captions_per_s, save_caption_rate
from .costs import (
    ASSUMED_UTILISATION,
    PEAK_BF16_TFLOPS,
    VIT_B16_TRAIN_TFLOP,
    Rates,
    cost_model_ratio,
    detect_gpu_type,
    estimate_rates,
    generation_tflop,
    generators_per_trainer,
    gpu_type_of,
    is_sd_family,
    results_dir,
    table_rates,
    trainer_tflop,
)
from .measure import (  # noqa: F401  (_device_name: read by the tests)
    _device_name,
    fingerprint,
    measure_generator_rate,
    measure_trainer_rate,
    measured_rates,
    rates_for,
)
from .split import (
    IDLE_WARNING,
    MIN_CALL_SECONDS,
    UNUSED_WARNING,
    WAIT_TARGET,
    Budget,
    Split,
    best_split,
    budget_for,
    check_balance,
    check_call_length,
    check_image_use,
    evaluate_split,
    per_unit_rates,
    plan,
)

__all__ = [
    "ASSUMED_UTILISATION",
    "IDLE_WARNING",
    "MIN_CALL_SECONDS",
    "PEAK_BF16_TFLOPS",
    "UNUSED_WARNING",
    "VIT_B16_TRAIN_TFLOP",
    "WAIT_TARGET",
    "Budget",
    "CaptionRate",
    "Rates",
    "Split",
    "best_split",
    "budget_for",
    "caption_rate",
    "check_caption_supply",
    "check_balance",
    "check_call_length",
    "check_image_use",
    "consumed_captions_per_s",
    "cost_model_ratio",
    "detect_gpu_type",
    "estimate_rates",
    "evaluate_split",
    "fingerprint",
    "generation_tflop",
    "gpu_type_of",
    "generators_per_trainer",
    "is_sd_family",
    "measure_generator_rate",
    "measure_trainer_rate",
    "measured_rates",
    "per_unit_rates",
    "plan",
    "rates_for",
    "results_dir",
    "save_caption_rate",
    "table_rates",
    "trainer_tflop",
]
