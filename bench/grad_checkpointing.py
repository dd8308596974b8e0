"""What ``model.grad_checkpointing`` trades: activation memory kept for the backward pass vs step time.

    uv run python -m bench.grad_checkpointing                       # ViT-B/16 at 224 px, 12 inputs, CPU
    uv run python -m bench.grad_checkpointing --batch 258 --device cuda       # a paper worker's share

The one training step (``TrainStep``, what the train loop runs) of the paper config's model, from the
same seeds, without and with checkpointing (fp32 on a CPU; the config's precision on a GPU). Memory:
the bytes of every tensor autograd saves for the backward pass but the parameters (a saved-tensors
hook around one step, exact on any device; a checkpointed block keeps only its input, which the hook
does not see, so that is added: inputs x tokens x width x 4 bytes per block), and on CUDA also torch's
peak allocation. Time: the fastest of --iters steps after one warm-up. Prints the ratios with / without.
"""

from __future__ import annotations

import os
import time

from . import common
from .gpu import sync

MODULE = "bench.grad_checkpointing"


def measure(args, checkpointing: bool) -> dict:
    import torch

    from stablerep_ray.training.step import TrainStep, synthetic_batch

    device = torch.device(args.device)
    cpu = ["train.precision=auto"] if device.type == "cpu" else []  # the paper's bf16 autocast crawls on CPUs
    config = common.load(args.config, [
        "train.num_workers=1", f"train.batch_size={args.batch}", f"model.grad_checkpointing={checkpointing}", *cpu,
        *args.overrides])
    torch.manual_seed(0)
    step = TrainStep.build(config, device, seed=1)
    batch = synthetic_batch(config, config.captions_per_worker_step)
    saved = 0
    weights = {p.untyped_storage().data_ptr() for p in step.model.parameters()}

    def pack(tensor):  # the parameters a layer saves are no new memory: not counted
        nonlocal saved
        if tensor.untyped_storage().data_ptr() not in weights:
            saved += tensor.numel() * tensor.element_size()
        return tensor

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step(batch)
    encoder = step.model.encoder
    inputs = config.captions_per_worker_step * config.group_size
    if checkpointing:  # each block's input, kept by the checkpoint itself
        tokens = encoder.patch_embed.num_patches + encoder.num_prefix_tokens
        saved += len(encoder.blocks) * inputs * tokens * encoder.embed_dim * 4
    seconds = []
    for _ in range(args.iters):
        sync(device)
        start = time.perf_counter()
        step(batch)
        sync(device)
        seconds.append(time.perf_counter() - start)
    row = {"grad_checkpointing": checkpointing, "inputs": inputs, "saved_mib": saved / 2**20,
           "step_s": min(seconds)}
    if device.type == "cuda":
        row["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(f"  grad_checkpointing={checkpointing!s:5}: {row['saved_mib']:8.0f} MiB saved for backward, "
          f"step {row['step_s']:.2f} s" + (f", peak {row['peak_allocated_gib']:.1f} GiB" if "peak_allocated_gib"
                                            in row else ""), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = common.arg_parser(MODULE, __doc__, config="configs/paper-vitb16-sd15.yaml")
    parser.add_argument("--batch", type=int, default=12, help="encoder inputs per step (train.batch_size)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args(argv)
    if args.device == "cpu":
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
    print(f"{common.command_line(MODULE)}: {args.config}, {args.batch} inputs, {args.device}")
    kept, recomputed = measure(args, False), measure(args, True)
    ratios = {"memory": recomputed["saved_mib"] / kept["saved_mib"], "time": recomputed["step_s"] / kept["step_s"]}
    print(f"with / without: memory saved for backward x{ratios['memory']:.2f}, step time x{ratios['time']:.2f}")
    path = common.write_result("grad_checkpointing", {"rows": [kept, recomputed], "ratios": ratios}, MODULE)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
