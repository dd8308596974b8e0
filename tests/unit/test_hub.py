"""A Hub id checked before Ray starts, through the real huggingface_hub client against a local server
that answers as the Hub does (the Hub itself is out of reach here): a typo, a gated model, a repository
of another kind and a pipeline the config cannot drive each refused in one line naming the key, for
``generator.model`` and ``captions.synth.model``; no Hub, a warning within seconds; HF_HUB_OFFLINE, the
same checks from the cache."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading

import pytest

COMMIT = "0123456789abcdef0123456789abcdef01234567"
HUNYUAN = {  # model_index.json and denoiser config of a pipeline that takes no guidance scale
    "model_index.json": {"_class_name": "HunyuanImagePipeline", "_diffusers_version": "0.42.1",
                         **{c: ["diffusers", "X"] for c in ("transformer", "vae", "text_encoder", "tokenizer",
                                                            "scheduler")}},
    "transformer/config.json": {"_class_name": "HunyuanImageTransformer2DModel", "guidance_embeds": True},
}
ERRORS = {"org/gated": (401, "GatedRepo"), "org/missing": (401, "RepoNotFound")}
CHECK = """
import json, sys, time
from stablerep_ray.captions.synth.llm import CausalLM
from stablerep_ray.captions.synth.preview import check_model_path
from stablerep_ray.config import ConfigError, GeneratorConfig, SynthConfig
from stablerep_ray.generation.diffusion import DiffusersGenerator
from stablerep_ray.generation.pipelines import check_pipeline
ACTIONS = {  # the driver's checks, and the actors' loading
    "llm": lambda model: check_model_path(SynthConfig(backend="transformers", model=model)),
    "load-llm": CausalLM,
    "load": lambda model: DiffusersGenerator(GeneratorConfig(model=model)),
}
for model in sys.argv[1:]:  # ACTION:ID, or a pipeline ID to check
    started = time.perf_counter()
    action, _, name = model.rpartition(":")
    try:
        ACTIONS.get(action, lambda model: check_pipeline(GeneratorConfig(model=model)))(name)
        outcome = "passed"
    except ConfigError as err:
        outcome = str(err)
    print(json.dumps({"model": model, "outcome": outcome, "seconds": time.perf_counter() - started}), flush=True)
"""


class FakeHub(http.server.BaseHTTPRequestHandler):
    """``/{org}/{name}/resolve/{revision}/{path}`` as the Hub serves it: the headers hf_hub_download reads
    (commit, ETag, size) and the file, or the Hub's error codes."""

    def do_HEAD(self):
        self.answer(body=False)

    def do_GET(self):
        self.answer(body=True)

    def answer(self, body: bool) -> None:
        parts = self.path.split("?")[0].lstrip("/").split("/")
        if parts[:2] == ["api", "models"]:  # the model info diffusers asks for first: the errors only
            parts = parts[2:] + ["resolve", "main", "-"]
        org, name, _, _, path = parts[0], parts[1], *parts[2:4], "/".join(parts[4:])
        repo = f"{org}/{name}"
        if repo in ERRORS:
            status, code = ERRORS[repo]
            return self.reply(status, {"X-Error-Code": code, "X-Error-Message": "from the test hub"})
        files = HUNYUAN if repo == "org/hunyuan" else {}
        if path not in files:
            return self.reply(404, {"X-Error-Code": "EntryNotFound", "X-Error-Message": "from the test hub"})
        data = json.dumps(files[path]).encode()
        self.reply(200, {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'},
                   data if body else b"", len(data))

    def reply(self, status: int, headers: dict, data: bytes = b"", length: int = 0) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(length or len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def check(endpoint: str, home, *models: str, **env) -> tuple[dict, str]:
    """Each model's check or load in one fresh process (huggingface_hub reads HF_ENDPOINT at import)."""
    done = subprocess.run(
        [sys.executable, "-c", CHECK, *models], capture_output=True, text=True, timeout=180,
        env={**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(home), **env},
    )
    assert done.returncode == 0, done.stderr
    return {r["model"]: r for r in map(json.loads, done.stdout.splitlines())}, done.stderr


@pytest.fixture(scope="module")
def answered(hub, tmp_path_factory):
    """Every case against the local Hub, in one process; then the pipeline it could read, offline."""
    home = tmp_path_factory.mktemp("hf")
    results, _ = check(hub, home, "org/missing", "org/gated", "org/weights-only", "org/hunyuan", "llm:org/gated",
                       "llm:org/hunyuan", "load:org/gated", "load-llm:org/missing")
    cached, _ = check(hub, home, "org/hunyuan", HF_HUB_OFFLINE="1")  # from the cache the run above filled
    return results, cached


@pytest.fixture(scope="module")
def unanswered(tmp_path_factory):
    """The driver's check and both loaders where nothing answers at the Hub's address."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
        results, warnings = check(endpoint, tmp_path_factory.mktemp("hf"), "org/anything", "load:org/anything",
                                  "load-llm:org/anything")
    return endpoint, results, warnings


def test_hub_failures_and_a_pipeline_the_config_cannot_drive_are_refused_before_ray(hub, answered):
    results, cached = answered
    assert results["org/missing"]["outcome"].startswith(
        "generator.model: org/missing is neither a directory nor a Hub repository that this machine can see; "
        "check the path or the id")
    assert results["org/gated"]["outcome"] == (
        f"generator.model: org/gated is gated on the Hugging Face Hub and the token of this machine has no access "
        f"to it; accept its terms at {hub}/org/gated and log in with that account (`hf auth login`, or HF_TOKEN "
        f"in the environment of every node)")
    assert results["org/weights-only"]["outcome"].startswith(
        "generator.model: org/weights-only on the Hugging Face Hub has no model_index.json")
    # fetched configs go through the checks a local directory gets, online or from the cache
    refused = results["org/hunyuan"]["outcome"]
    assert "HunyuanImagePipeline, which takes neither guidance_scale nor true_cfg_scale" in refused
    assert cached["org/hunyuan"]["outcome"] == results["org/hunyuan"]["outcome"]


def test_a_caption_model_on_the_hub_is_checked_the_same_way(answered):
    results, _ = answered
    assert results["llm:org/gated"]["outcome"].startswith(
        "captions.synth.model: org/gated is gated on the Hugging Face Hub and the token of this machine has no access")
    assert results["llm:org/hunyuan"]["outcome"] == (  # a pipeline repository: no config.json at its root
        "captions.synth.model: org/hunyuan on the Hugging Face Hub has no config.json, so it is not a transformers "
        "model repository; use the model's transformers repository")


def test_actors_loading_from_the_hub_refuse_in_the_same_words(answered):
    """The generator and caption actors' from_pretrained, for what the driver could not check: the line
    names the node."""
    results, _ = answered
    assert results["load:org/gated"]["outcome"].startswith(
        f"generator.model: org/gated is gated on the Hugging Face Hub and the token of node {socket.gethostname()} "
        f"has no access to it")
    assert results["load-llm:org/missing"]["outcome"].startswith(
        f"captions.synth.model: org/missing is neither a directory nor a Hub repository that node "
        f"{socket.gethostname()} can see")


def test_no_hub_is_a_warning_within_seconds(unanswered):
    """huggingface_hub alone would retry the connection for 23 s; the actors then try their own nodes."""
    endpoint, results, warnings = unanswered
    assert results["org/anything"]["outcome"] == "passed" and results["org/anything"]["seconds"] < 3
    assert warnings.strip() == (
        f"warning: generator.model: org/anything is not checked before start: this machine's Hugging Face cache "
        f"does not hold it and the Hub cannot be reached (no connection to {endpoint}); each actor loads it "
        f"from its own node's cache or the Hub")


def test_actors_with_no_hub_fail_at_once(unanswered):
    endpoint, results, _ = unanswered
    for loader in ("load:org/anything", "load-llm:org/anything"):
        assert f"cannot be reached from there (no connection to {endpoint})" in results[loader]["outcome"]
        assert results[loader]["seconds"] < 10  # not the client's 23 s of retries
