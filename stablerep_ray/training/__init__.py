"""Training: objectives (registered methods), the one training step, the per-worker loop, checkpoints,
and the TorchTrainer around them (``training.trainer.fit``)."""
