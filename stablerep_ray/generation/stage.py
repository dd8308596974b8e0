"""Generation stage: caption rows -> one row per caption with its n images, on a fixed actor pool.

Output rows: the caption columns (``chunk``, ``row``, ``chunk_rows``, ``caption_id``, ``caption``),
``images`` (n, S, S, 3) uint8 at the stored resolution ``output_size``, and ``num_images`` (valid
images first; the safety checker may drop some). The backend is chosen by ``generator.backend``
(``generation/backends.py``).
"""

from __future__ import annotations

import numpy as np

from ..captions import EMPTY_CHUNK_ID
from ..config import SYNTH_SOURCE, Config, GeneratorConfig
from .backends import generator_class


class GeneratorActor:
    """The Ray Data callable: the configured backend; empty-chunk marker rows pass unrendered."""

    def __init__(self, config: GeneratorConfig):
        self.cfg = config
        self.backend = generator_class(config)(config)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        real = batch["caption_id"] != EMPTY_CHUNK_ID
        if real.all():
            return self.backend(batch)
        n, size = self.cfg.images_per_caption, self.cfg.output_size
        images = np.zeros((len(real), n, size, size, 3), dtype=np.uint8)
        num_images = np.zeros(len(real), dtype=np.int32)
        if real.any():
            out = self.backend({k: v[real] for k, v in batch.items()})
            images[real], num_images[real] = out["images"], out["num_images"]
        return {**batch, "images": images, "num_images": num_images}


def build_image_stream(config: Config, start_chunk: int = 0, captions_per_pass: int | None = None):
    """Captions from stream chunk ``start_chunk`` -> generator actor pool: what the trainer consumes.
    ``captions_per_pass`` (``count_captions_per_pass``) is counted here unless the caller has it."""
    import ray.data

    from ..captions import count_captions_per_pass, read_captions

    if captions_per_pass is None:
        captions_per_pass = count_captions_per_pass(config.captions)
    gen, t = config.generator, config.train
    needed = t.steps * t.batch_size // config.group_size // config.stream.reuse + 4 * gen.captions_per_call
    remote_args = {"label_selector": gen.label_selector} if gen.label_selector else {}
    if config.captions.source == SYNTH_SOURCE:  # captions written as the run goes: one more streamed stage
        from ..captions.synth.stream import synth_captions

        captions = synth_captions(config.captions.synth, start_chunk, needed)
    else:
        captions = read_captions(config.captions, start_chunk, needed, captions_per_pass)
    # One block per generator call: a map task emits its output only when its input block is done,
    # so a 10k-caption chunk would otherwise hold back every image for hours.
    captions = captions.repartition(target_num_rows_per_block=gen.captions_per_call)
    images = captions.map_batches(
        GeneratorActor,
        fn_constructor_kwargs={"config": gen},
        batch_size=gen.captions_per_call,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=gen.num_actors),
        num_gpus=gen.num_gpus_per_actor or None,
        num_cpus=gen.num_cpus_per_actor,
        **remote_args,
    )
    # Stream order (stream.keep_order): chunks and passes are read and split concurrently, and without
    # it their rows interleave, so neither a caption file's order (a curriculum, such as the spatial
    # quickstart's warm-up) nor the stream (for a rerun) would be reproducible. Generator calls still
    # run in parallel; a finished call's images wait only for the calls before it.
    images.context.execution_options.preserve_order = config.stream.keep_order
    return images
