"""Caption identity: one id per normalised text, new images for every place the text appears."""

from __future__ import annotations

import numpy as np

from stablerep_ray.captions.files import caption_rows, normalise_caption, plan_chunks, read_chunk
from stablerep_ray.config import CaptionsConfig, GeneratorConfig
from stablerep_ray.stream.replay import GroupStream
from stablerep_ray.tools.simulator import SimulatorGenerator


def test_normalisation_folds_spacing_unicode_form_and_byte_order_mark():
    assert normalise_caption("\ufeff  a red\tcircle \r\n") == "a red circle"
    assert normalise_caption("cafe\u0301 on a table") == normalise_caption("caf\u00e9 on a table")
    assert normalise_caption("A red circle") != normalise_caption("a red circle"), "case is content"


def test_identical_captions_at_two_places_are_positives_with_different_images(tmp_path):
    source = tmp_path / "captions.txt"
    source.write_text("a red circle\na blue square\n\ufeffa  red circle \ncaf\u00e9 scene\ncafe\u0301 scene\n",
                      encoding="utf-8")
    cfg = CaptionsConfig(source=str(source))
    positions, texts, _ = read_chunk(cfg, plan_chunks(cfg)[0])
    rows = caption_rows(0, positions, texts)
    ids = rows["caption_id"]
    assert ids[0] == ids[2] and ids[3] == ids[4] and len(set(ids)) == 3
    assert len(set(rows["position"])) == 5

    generated = SimulatorGenerator(GeneratorConfig(backend="simulator", images_per_caption=2, output_size=16))(rows)
    images = generated["images"]
    assert not np.array_equal(images[0], images[2]), "a repeated caption adds new images, not copies"
    assert not np.array_equal(images[3], images[4])

    stream = GroupStream(iter([generated]), captions_per_step=5, images_per_group=2, reuse=1,
                         buffer_groups=5, seed=0)
    batch = stream.next_batch()
    labels = dict(zip(batch.keys.tolist(), batch.group_ids.tolist(), strict=True))
    keys = [0 << 32 | row for row in range(5)]
    assert labels[keys[0]] == labels[keys[2]] and labels[keys[3]] == labels[keys[4]]
    assert labels[keys[0]] != labels[keys[1]], "the loss sees the two places as one caption's positives"
