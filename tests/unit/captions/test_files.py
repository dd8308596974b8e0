"""Caption identity: one id per normalised text, new images for every place the text appears."""

from __future__ import annotations

import numpy as np

from stablerep_ray.captions.files import (
    caption_rows,
    count_captions_per_pass,
    normalise_caption,
    plan_chunks,
    read_chunk,
    stream_chunks,
    whole_file_warnings,
)
from stablerep_ray.config import SYNTH_SOURCE, CaptionsConfig, GeneratorConfig
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


def test_every_pass_over_a_repeated_source_renders_new_images_and_a_rerun_the_same(tmp_path):
    """Stream chunk seq of a one-chunk file is pass seq: its rows keep their positions, their images change
    from pass to pass (not copies at full generation cost), and pass 0 keeps the seeds it always had."""
    from stablerep_ray.captions.files import read_chunks
    from stablerep_ray.generation.backends import image_keys

    source = tmp_path / "captions.txt"
    source.write_text("a red circle\na blue square\n")
    cfg = CaptionsConfig(source=str(source))
    chunks = plan_chunks(cfg)
    passes = [next(read_chunks({"chunk": [seq]}, cfg, chunks)).to_pydict() for seq in (0, 1, 2)]
    assert [p["source_pass"] for p in passes] == [[0, 0], [1, 1], [2, 2]]
    assert passes[0]["position"] == passes[1]["position"] and passes[0]["caption_id"] == passes[2]["caption_id"]
    generator = SimulatorGenerator(GeneratorConfig(backend="simulator", images_per_caption=2, output_size=16))
    images = [generator({k: np.asarray(v) for k, v in p.items()})["images"] for p in passes]
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[1], images[2])
    again = next(read_chunks({"chunk": [1]}, cfg, chunks)).to_pydict()
    np.testing.assert_array_equal(generator({k: np.asarray(v) for k, v in again.items()})["images"], images[1])
    first = {k: np.asarray(v) for k, v in passes[0].items()}
    np.testing.assert_array_equal(image_keys(first), first["position"])


def test_the_stream_plans_the_passes_a_run_needs_from_the_counted_captions(tmp_path):
    """1,032 captions from a one-chunk file of 5,000: the current pass and one more. Unknown (0), every
    chunk counts as one caption: 1,033 planned passes, which Ray Data reads ahead into (a 4-step
    run took twice as long), so the trainer and the stream count the captions when not told."""
    source = tmp_path / "captions.txt"
    source.write_text("".join(f"caption {i}\n" for i in range(5000)))
    cfg = CaptionsConfig(source=str(source))
    assert count_captions_per_pass(cfg) == 5000
    assert count_captions_per_pass(CaptionsConfig(source=SYNTH_SOURCE)) == 0
    assert stream_chunks(1, 0, 1032, count_captions_per_pass(cfg)) == range(0, 2)
    assert stream_chunks(1, 0, 1032, 0) == range(0, 1033)
    assert stream_chunks(4, 6, 0, 5000) == range(6, 8), "no repeat: to the end of the current pass"


def test_a_large_csv_is_named_because_it_is_read_whole(tmp_path):
    (tmp_path / "big.csv").write_text("caption\n" + "a red circle\n" * 100)
    (tmp_path / "big.jsonl").write_text('{"caption": "a red circle"}\n' * 100)  # cut into byte ranges
    (tmp_path / "small.tsv").write_text("caption\na red circle\n")
    warnings = whole_file_warnings(CaptionsConfig(source=str(tmp_path)), limit=1000)
    assert len(warnings) == 1 and "big.csv" in warnings[0] and "convert it to jsonl or parquet" in warnings[0]
