"""Caption synthesis as one more streamed stage, on a real local Ray: concepts -> prompts -> captions
(rules, a transformers actor pool, an OpenAI-compatible HTTP server) -> generator actors -> trainer."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from repo import CONFIGS, ROOT

from stablerep_ray.captions import EMPTY_CHUNK_ID, caption_id
from stablerep_ray.config import load_config
from stablerep_ray.models import build_model, load_model
from stablerep_ray.training.trainer import fit

pytestmark = [pytest.mark.usefixtures("local_ray"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]

SYNTH_QUICKSTART = CONFIGS / "synclr-captions-quickstart.yaml"
STEPS = 60
MARGIN = 0.15  # the same bar as the file-caption quickstart's (tests/system/test_learning.py says why)



@pytest.fixture(autouse=True)
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the configs name the concept files relative to the repository


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    from stablerep_ray.tools.tiny_llm import make_tiny_llm

    return make_tiny_llm(tmp_path_factory.mktemp("llm") / "tiny-llm")


def test_template_captions_stream_into_the_simulator_and_the_trainer_learns(tmp_path):
    """The synth quickstart, shortened: no caption file anywhere, and held-out kNN rises well above init."""
    from system.test_learning import knn_top1

    config = load_config(SYNTH_QUICKSTART, [
        f"output_dir={tmp_path}", "name=synth-learning", f"train.steps={STEPS}", f"train.checkpoint_every={STEPS}",
        "train.max_failures=0", "train.image_grid_every=0", "eval.data=",
    ])
    assert config.captions.source == "synth" and config.captions.synth.backend == "template"
    torch.manual_seed(config.train.seed)
    random_init = build_model(config).eval()
    start = time.perf_counter()
    result = fit(config)
    train_s = time.perf_counter() - start
    assert result.error is None, result.error
    with result.checkpoint.as_directory() as ckpt:
        trained, _ = load_model(ckpt)
    size = config.generator.output_size
    acc_random = knn_top1(random_init, config.model.image_size, size)
    acc_trained = knn_top1(trained, config.model.image_size, size)
    print(f"synth captions -> simulator: kNN top-1 (held-out colour) random init {acc_random:.3f}, after "
          f"{STEPS} steps {acc_trained:.3f} (training {train_s:.0f} s)")
    assert acc_trained >= acc_random + MARGIN, (acc_random, acc_trained)


def consumed_prompts(run_dir, start_step: int, prompts_per_chunk: int) -> list[int]:
    """Prompt indices the workers were served, from the consumed logs of the run started at ``start_step``."""
    indices = []
    for path in sorted((run_dir / "consumed").glob(f"rank*-from{start_step:08d}-*.jsonl")):
        for line in path.read_text().splitlines():
            for key in json.loads(line)["keys"]:
                indices.append((key >> 32) * prompts_per_chunk + (key & 0xFFFFFFFF))
    return indices


def test_restart_resumes_the_prompt_index_with_no_gap(tmp_path):
    """Stop at a checkpoint, rerun: every prompt before the recorded resume chunk was consumed, the rerun
    starts at that chunk, and the only prompts served twice are the rows the checkpoint reported."""
    per_chunk = 64
    config = load_config(SYNTH_QUICKSTART, [
        f"output_dir={tmp_path}", "name=synth-resume", "train.steps=16", "train.checkpoint_every=7",
        "train.max_failures=0", "train.image_grid_every=0", "eval.data=", "stream.log_consumed=true",
        f"captions.synth.prompts_per_chunk={per_chunk}", f"generator.captions_per_call={per_chunk}",
    ])
    first = fit(config, max_steps=7)
    assert first.error is None, first.error
    resume_chunk = first.metrics["stream/resume_chunk"]
    second = fit(config)
    assert second.error is None and second.metrics["step"] == 16, second.error
    before = consumed_prompts(config.run_dir, 0, per_chunk)
    after = consumed_prompts(config.run_dir, 7, per_chunk)
    assert len(before) == 7 * 32 and len(after) == 9 * 32  # 32 captions a step, each served once (R = 1)
    assert len(set(before)) == len(before) and len(set(after)) == len(after)
    cut = resume_chunk * per_chunk
    assert resume_chunk >= 1 and set(range(cut)) <= set(before), "a prompt before the resume chunk was skipped"
    assert min(after) >= cut, "the rerun started before the checkpoint's resume chunk"
    # served before the checkpoint and again after it: exactly what the resumed run reports, no more
    assert sum(i >= cut for i in before) == second.metrics["stream/rows_repeated_on_resume"]
    assert set(range(cut + per_chunk)) <= set(before) | set(after), "a gap after the resume point"


def test_transformers_backend_streams_into_the_tiny_diffusers_pipeline(tmp_path, tiny_llm):
    """Plumbing: a tiny random causal LM on a Ray Data actor pool writes the captions a tiny random SD
    pipeline renders, and DDP workers train on them."""
    from stablerep_ray.tools.tiny_pipeline import make_tiny_pipeline

    pipeline = make_tiny_pipeline(tmp_path / "tiny-sd", sample_size=8)
    config = load_config(CONFIGS / "tiny-diffusers.yaml", [
        f"output_dir={tmp_path}", "name=synth-transformers", f"generator.model={pipeline}", "generator.resolution=64",
        "generator.steps=2", "train.steps=3", "train.checkpoint_every=3", "train.max_failures=0",
        "stream.log_consumed=true", "captions.source=synth", "captions.synth.backend=transformers",
        f"captions.synth.model={tiny_llm}", "captions.synth.concepts=[data/concepts/everyday.json]",
        "captions.synth.backgrounds=data/concepts/places.txt", "captions.synth.textures=data/concepts/patterns.txt",
        "captions.synth.max_tokens=12", "captions.synth.batch_size=8", "captions.synth.prompts_per_chunk=16",
    ])
    result = fit(config)
    assert result.error is None, result.error
    assert result.metrics["step"] == 3 and np.isfinite(result.metrics["loss"])
    served = [i for p in (config.run_dir / "consumed").glob("*.jsonl") for line in p.read_text().splitlines()
              for i in json.loads(line)["ids"]]
    assert len(served) == 3 * 16 // 2 and EMPTY_CHUNK_ID not in served


class _Completions(BaseHTTPRequestHandler):
    """A minimal OpenAI-compatible /v1/completions endpoint around one CausalLM."""

    lm = None
    lock = threading.Lock()  # one generate at a time: the server answers on several threads
    requests: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append(body)
        with self.lock:
            text = self.lm.complete([body["prompt"]], [body["seed"]], body["temperature"], body["top_p"],
                                    body["max_tokens"])[0]
        if body["seed"] % 5 == 0:
            text = "\n" + text  # a completion whose first line is blank: it must be dropped and counted
        reply = json.dumps({"object": "text_completion", "model": body.get("model"),
                            "choices": [{"index": 0, "text": text, "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


def test_http_backend_writes_captions_through_a_local_completions_server(tmp_path, tiny_llm, monkeypatch):
    """Ray Data LLM's HTTP processor against a server on 127.0.0.1 serving the tiny model: every prompt gives
    one row, the blank first lines are dropped and counted, and the preview reports them."""
    from stablerep_ray.captions.synth.llm import CausalLM
    from stablerep_ray.captions.synth.pools import load_pools, with_absolute_paths
    from stablerep_ray.captions.synth.preview import preview
    from stablerep_ray.captions.synth.prompts import make_prompt

    _Completions.lm = CausalLM(str(tiny_llm))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Completions)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("STABLEREP_BENCH_RESULTS", str(tmp_path / "results"))
    try:
        config = load_config(SYNTH_QUICKSTART, [
            "captions.synth.backend=http", f"captions.synth.url=http://127.0.0.1:{server.server_port}/v1/completions",
            "captions.synth.model=tiny", "captions.synth.max_tokens=12", "captions.synth.batch_size=8",
            "captions.synth.prompts_per_chunk=16", "captions.synth.num_actors=2",
            "captions.synth.num_cpus_per_actor=0.5",
        ])
        report = preview(config, 40, str(tmp_path / "captions.jsonl"))
    finally:
        server.shutdown()
    rows = [json.loads(line) for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
    assert [r["position"] for r in rows] == list(range(40))
    blank = {r["position"] for r in rows if r["dropped"] == "blank"}
    synth = with_absolute_paths(config.captions.synth)
    forced = {i for i in range(40) if make_prompt(load_pools(synth), synth, i).seed % 5 == 0}
    assert len(_Completions.requests) == 48 and forced and forced <= blank
    assert all(r["caption"] for r in rows if not r["dropped"])
    assert all(b["model"] == "tiny" and b["stop"] == ["\n"] for b in _Completions.requests)
    assert f"dropped {len(blank)} of 40 completions ({len(blank)} blank" in report
    assert (tmp_path / "results" / "caption-rates.json").is_file()
    kept = [r for r in rows if not r["dropped"]]
    assert all(caption_id(r["caption"]) != EMPTY_CHUNK_ID for r in kept)


def test_the_vllm_stage_is_built_from_the_installed_ray_api(tiny_llm):
    """The vllm backend's processor, as a run builds it (vllm itself runs only inside its GPU actors, so
    this needs no GPU): one raw-completion engine stage, a fixed pool, the GPUs and node labels asked for."""
    from stablerep_ray.captions.synth.stream import vllm_processor

    cfg = load_config(CONFIGS / "synclr-captions-llama-sd15.yaml", [f"captions.synth.model={tiny_llm}"]).captions.synth
    processor = vllm_processor(cfg)
    assert list(processor.stages) == ["vLLMEngineStage"]  # no chat template, tokenizer or detokenizer stage
    engine = processor.stages["vLLMEngineStage"].get_dataset_map_batches_kwargs(cfg.batch_size, "__data")
    pool = engine["compute"]
    assert (pool.min_size, pool.max_size) == (cfg.num_actors, cfg.num_actors)
    assert engine["num_gpus"] == 1 and engine["label_selector"] == {"stablerep/role": "generator"}
    assert engine["fn_constructor_kwargs"]["engine_kwargs"]["max_model_len"] == 2048
