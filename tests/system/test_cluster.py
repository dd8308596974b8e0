"""Cluster launch files and the Ray-job entry points.

* cluster.yaml / cluster-gcp.yaml pass Ray's own cluster-config validation (the JSON schema and
  checks `ray up` runs before it calls the cloud), their node labels are what the configs'
  label_selectors ask for, and the paper run fits the nodes they launch.
* jobs/runtime_env.yaml keeps the working_dir upload small.
* jobs/*.py behave like the CLI, and a real `ray job submit` of jobs/train.py against a local head
  (loopback, token authentication on, as on a 2.60 cluster) trains, checkpoints and logs.
"""

from __future__ import annotations

import copy
import json
import math
import re
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from local_head import RAY, LocalHead, free_ports
from repo import ROOT
from terminal import DURATION

from stablerep_ray.config import load_config
from stablerep_ray.storage import latest_checkpoint

CLUSTER_FILES = ["cluster.yaml", "cluster-gcp.yaml"]
RAY_IMAGE = "rayproject/ray:2.60.0-py311-gpu"
ROLE = "stablerep/role"


def load_yaml(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def worker_types(cluster: dict) -> dict:
    return {k: v for k, v in cluster["available_node_types"].items() if k != cluster["head_node_type"]}


def selectors() -> list[tuple[str, str, dict]]:
    """(config file, section, label_selector) for every non-empty selector in configs/."""
    found = []
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        for section in ("generator", "train"):
            selector = (data.get(section) or {}).get("label_selector") or {}
            if selector:
                found.append((path.name, section, selector))
    return found


# -- cluster launch files ------------------------------------------------------------------------
@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_cluster_file_passes_ray_validation(name):
    """What `ray up` does before any cloud call: merge provider defaults, then validate_config
    (ray/autoscaler/ray-schema.json plus the min/max worker and head-type checks)."""
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load_yaml(name)
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(raw, schema)  # the file as written
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)  # the file as `ray up` sees it
    # Our commands replace the provider defaults (which would pip-install a dev wheel of Ray).
    assert prepared["setup_commands"] == raw["setup_commands"]
    assert all("ray-3.0.0.dev0" not in cmd for cmd in prepared["head_setup_commands"])


def test_schema_checks_node_labels():
    """`labels` is a first-class per-node-type key of the 2.60 schema, string values only; so the
    test above really checks our labels (and a typo'd key would be rejected too)."""
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    node_type = schema["properties"]["available_node_types"]["patternProperties"][".*"]
    assert node_type["properties"]["labels"]["type"] == "object"
    assert node_type["additionalProperties"] is False
    bad = load_yaml("cluster.yaml")
    bad["available_node_types"]["trainer"]["labels"] = {ROLE: 1}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    bad = load_yaml("cluster.yaml")
    bad["available_node_types"]["trainer"]["label"] = {ROLE: "trainer"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_cluster_file_basics(name):
    import ray

    cluster = load_yaml(name)
    assert cluster["docker"]["image"] == RAY_IMAGE
    assert RAY_IMAGE.split(":")[1].startswith(ray.__version__ + "-")  # the image runs our Ray
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    assert {t["labels"][ROLE] for t in worker_types(cluster).values()} == {"generator", "trainer"}
    for node_type in worker_types(cluster).values():
        assert node_type["resources"]["GPU"] > 0
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"]
    assert cluster["max_workers"] >= sum(t["max_workers"] for t in worker_types(cluster).values())
    assert "~/stablerep-ray" in cluster["file_mounts"]
    assert any("uv pip install" in cmd or "pip install -e" in cmd for cmd in cluster["setup_commands"])
    assert cluster["provider"]["type"] == ("aws" if name == "cluster.yaml" else "gcp")


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_node_labels_match_config_selectors(name):
    from ray._private.label_utils import validate_label_selector, validate_node_label_syntax

    cluster = load_yaml(name)
    for node_type in cluster["available_node_types"].values():
        validate_node_label_syntax(node_type.get("labels", {}))
    found = selectors()
    assert {section for _, section, _ in found} >= {"generator", "train"}, "paper config lost its selectors"
    for config_name, section, selector in found:
        assert validate_label_selector(selector) is None, (config_name, section)
        matching = [
            type_name for type_name, node_type in worker_types(cluster).items()
            if all(node_type.get("labels", {}).get(k) == v for k, v in selector.items())
        ]
        assert matching, f"{config_name}: {section}.label_selector {selector} matches no node type of {name}"


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_paper_run_fits_the_nodes_ray_up_launches(name):
    """stablerep-ray checks the fit against the resources present at start, i.e. min_workers."""
    from stablerep_ray.config import load_config
    from stablerep_ray.runtime import check_fits

    config = load_config(ROOT / "configs/paper-vitb16-sd15.yaml")
    cluster = load_yaml(name)
    by_role = {t["labels"][ROLE]: t for t in worker_types(cluster).values()}

    def per_node(node_type, gpus, cpus):
        res = node_type["resources"]
        return min(res["GPU"] // gpus if gpus else math.inf, res["CPU"] // cpus if cpus else math.inf)

    g, t = config.generator, config.train
    gen, trn = by_role["generator"], by_role["trainer"]
    assert per_node(gen, g.num_gpus_per_actor, g.num_cpus_per_actor) * gen["min_workers"] >= g.num_actors
    assert per_node(trn, 1, t.num_cpus_per_worker) * trn["min_workers"] >= t.num_workers
    nodes = [(cluster["available_node_types"][cluster["head_node_type"]], 1)]
    nodes += [(node_type, node_type["min_workers"]) for node_type in worker_types(cluster).values()]
    cpus, gpus = (sum(t["resources"].get(key, 0) * count for t, count in nodes) for key in ("CPU", "GPU"))
    check_fits(config, cpus, gpus, where=name)  # raises ConfigError naming the key to change


# -- runtime env -----------------------------------------------------------------------------------
def test_runtime_env_keeps_the_upload_small(tmp_path):
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE, _zip_files

    runtime_env = load_yaml("jobs/runtime_env.yaml")
    assert runtime_env["env_vars"]["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] == "0"
    assert set(runtime_env) <= {"working_dir", "excludes", "env_vars"}
    # Build the package exactly as `ray job submit --working-dir .` would, ignoring .gitignore
    # (RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1): the excludes alone must keep it small.
    package = tmp_path / "pkg.zip"
    _zip_files(str(ROOT), runtime_env["excludes"], str(package), include_gitignore=False)
    import zipfile

    names = zipfile.ZipFile(package).namelist()
    for prefix in (".venv/", "outputs/", ".git/", "bench/results/", ".pytest_cache/"):
        assert not [n for n in names if n.startswith(prefix)], prefix
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    for needed in ("jobs/train.py", "stablerep_ray/cli.py", "configs/quickstart.yaml",
                   "data/simulator_captions.txt", "pyproject.toml"):
        assert needed in names
    assert package.stat().st_size < min(64 * 2**20, GCS_STORAGE_MAX_SIZE)


# -- entry points ----------------------------------------------------------------------------------
def _run(cmd, cwd, timeout=120):
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("command", ["train", "tune", "eval"])
def test_job_entry_point_runs_from_any_directory(command, tmp_path):
    """`python jobs/<command>.py` parses exactly like `stablerep-ray <command>`, from any cwd."""
    script = ROOT / "jobs" / f"{command}.py"
    cli = [sys.executable, "-c", "import sys; from stablerep_ray.cli import main; sys.exit(main(sys.argv[1:]))"]
    ours = _run([sys.executable, str(script), "--help"], cwd=tmp_path)
    theirs = _run([*cli, command, "--help"], cwd=tmp_path)
    assert (ours.returncode, ours.stdout, ours.stderr) == (theirs.returncode, theirs.stdout, theirs.stderr)


@pytest.mark.parametrize("command", ["train", "tune", "eval"])
def test_job_entry_point_exit_code_and_errors(command, capsys, monkeypatch):
    """Same exit code and message as the CLI on a user error (the job's status follows it)."""
    import runpy

    from stablerep_ray.cli import main

    args = ["--checkpoint", "/nonexistent", "--data", "simulator:shape"] if command == "eval" else ["/nonexistent.yaml"]
    try:
        expected = main([command, *args])
    except SystemExit as exit_:
        expected = exit_.code
    expected_err = capsys.readouterr().err
    script = ROOT / "jobs" / f"{command}.py"
    monkeypatch.setattr(sys, "argv", [str(script), *args])
    monkeypatch.syspath_prepend(str(script.parent))  # as `python jobs/x.py` does
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_.value.code == expected != 0
    assert capsys.readouterr().err == expected_err


# -- a real job submission -----------------------------------------------------------------------------
class Head(LocalHead):
    """A private head with the dashboard (its job server answers `ray job submit`); node labels as
    the autoscaler sets them for a node type's `labels:` in cluster.yaml."""

    def __init__(self, workdir: Path, labels: dict[str, str]):
        dash, client, agent, agent_grpc, metrics, env_agent = free_ports(6)
        self.url = f"http://127.0.0.1:{dash}"
        super().__init__(
            workdir, num_cpus=8, env={"RAY_OVERRIDE_LABELS": json.dumps(labels)},
            args=("--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
                  f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
                  f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
                  f"--runtime-env-agent-port={env_agent}"),
        )

    def request(self, path: str, auth: bool = True) -> tuple[int, str]:
        headers = {"Authorization": f"Bearer {self.token}"} if auth else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(self.url + path, headers=headers), timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode(errors="replace")
        except OSError as err:
            return 0, str(err)

    def wait_ready(self, timeout: float) -> None:
        self.wait_until(lambda: self.request("/api/jobs/")[0] == 200, timeout, f"dashboard at {self.url}")


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    from ray._private.utils import get_dashboard_dependency_error

    missing = get_dashboard_dependency_error()
    if missing:  # the job server lives in the dashboard, which needs ray[default]
        pytest.skip(f"ray job submit needs ray[default] (dashboard job server) in this venv: {missing}")
    head = Head(tmp_path_factory.mktemp("ray_head"), labels={ROLE: "trainer"})
    try:
        head.wait_ready(timeout=90)
        yield head
    finally:
        head.stop()


def test_token_auth_is_enforced(ray_head):
    assert ray_head.request("/api/jobs/", auth=False)[0] == 401
    assert ray_head.request("/api/jobs/")[0] == 200


def submit_train(head: Head, tmp_path: Path, *overrides: str) -> str:
    """`ray job submit --no-wait` of jobs/train.py: the quickstart at 16 images a step, on a short caption
    file, Ray Train's retries off; its submission id."""
    captions = tmp_path / "captions.txt"  # the stream holds at least one full pass of it
    captions.write_text("".join((ROOT / "data/simulator_captions.txt").read_text().splitlines(True)[:64]))
    submission_id = f"stablerep-test-{secrets.token_hex(4)}"
    overrides = ("train.batch_size=16", "train.warmup_steps=1", "generator.captions_per_call=4",
                 "stream.buffer_mb=64", "train.max_failures=0", "eval.data=", f"captions.source={captions}",
                 *overrides)
    submit = subprocess.run(
        [str(RAY), "job", "submit", "--address", head.url, "--submission-id", submission_id,
         "--working-dir", ".", "--runtime-env", "jobs/runtime_env.yaml", "--no-wait", "--",
         "python", "jobs/train.py", "configs/quickstart.yaml",
         *[arg for item in overrides for arg in ("--set", item)], "--output-dir", str(tmp_path / "out")],
        cwd=ROOT, env=head.env, capture_output=True, text=True, timeout=120,
    )
    assert submit.returncode == 0, submit.stdout + submit.stderr
    return submission_id


def job_logs(head: Head, submission_id: str) -> str:
    return json.loads(head.request(f"/api/jobs/{submission_id}/logs")[1] or "{}").get("logs", "")


def stop_job(head: Head, submission_id: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(RAY), "job", "stop", "--address", head.url, submission_id],
                          env=head.env, capture_output=True, text=True, timeout=120)


def wait_for_job(head: Head, submission_id: str, timeout: float, until=lambda logs: False) -> str:
    """The job's status once it has ended or its log satisfies ``until``; after ``timeout`` the job is
    stopped and the status says so."""
    status, deadline = "PENDING", time.monotonic() + timeout
    while time.monotonic() < deadline:
        code, body = head.request(f"/api/jobs/{submission_id}")
        status = json.loads(body)["status"] if code == 200 else status
        if status in ("SUCCEEDED", "FAILED", "STOPPED") or until(job_logs(head, submission_id)):
            return status
        time.sleep(2)
    stop_job(head, submission_id)
    return f"{status} after {timeout:.0f}s (stopped by the test)"


def test_ray_job_submit_train(ray_head, tmp_path):
    out = tmp_path / "out"
    submission_id = submit_train(
        ray_head, tmp_path, "train.steps=4", "train.checkpoint_every=2", "train.log_every=1",
        # Train workers go to nodes labelled like cluster.yaml's trainer type (this head is one).
        "train.label_selector={stablerep/role: trainer}",
        # Shared storage (an s3:// bucket on a real cluster): checkpoints and a TensorBoard mirror.
        f"cluster.storage_path={tmp_path / 'storage'}",
    )
    status = wait_for_job(ray_head, submission_id, timeout=210)  # ~100 s on an idle 2-core machine
    logs = job_logs(ray_head, submission_id)
    (tmp_path / "job.log").write_text(logs)
    assert status == "SUCCEEDED", f"job {status}; last log lines:\n" + "\n".join(logs.splitlines()[-60:])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "storage" / "quickstart"
    checkpoints = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert [c.name for c in checkpoints] == ["checkpoint_00000002", "checkpoint_00000004"]
    assert all((c / "model.pt").is_file() for c in checkpoints)
    assert list((out / "quickstart" / "tensorboard").glob("events.out.tfevents.*"))  # rank 0's node
    mirrored = EventAccumulator(str(run_dir / "tensorboard"))  # next to the checkpoints
    mirrored.Reload()
    assert [e.step for e in mirrored.Scalars("loss/total")] == [1, 2, 3, 4]  # step N: after N steps
    assert f"checkpoint: {checkpoints[-1]}" in logs


def test_ray_job_stop_ends_the_run_like_ctrl_c(ray_head, tmp_path):
    """`ray job stop` sends the driver SIGTERM: the job's log ends as a Ctrl-C'd run's console does (where
    it got to, the checkpoint the same command resumes from), within RAY_JOB_STOP_WAIT_TIME_S, not with
    a SIGKILL 3 s later and no word."""
    submission_id = submit_train(ray_head, tmp_path, "train.log_every=2", "train.checkpoint_every=2")
    # Train's controller commits a reported checkpoint a poll after the console logs its step: stop once
    # one is committed, or the (true) ending says "none yet".
    run = load_config(ROOT / "configs/quickstart.yaml", [f"output_dir={tmp_path / 'out'}"])
    status = wait_for_job(ray_head, submission_id, timeout=210,
                          until=lambda logs: "step 4/200" in logs and latest_checkpoint(run) is not None)
    assert status == "RUNNING", f"job {status}:\n" + job_logs(ray_head, submission_id)[-3000:]
    t0 = time.monotonic()
    stop = stop_job(ray_head, submission_id)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    status = wait_for_job(ray_head, submission_id, timeout=90)
    logs = job_logs(ray_head, submission_id)
    print(f"stopped in {time.monotonic() - t0:.0f}s\n{logs}")
    lines = logs.splitlines()
    assert status == "STOPPED"
    run_dir = tmp_path / "out" / "quickstart"
    assert re.fullmatch(rf"interrupted after {DURATION}: last logged step \d+/200", lines[-3]), lines[-3:]
    assert re.fullmatch(rf"checkpoint: {run_dir}/checkpoint_\d+ \(step \d+\); the same command resumes from it",
                        lines[-2]), lines[-2]
    assert "SIGTERM received" not in logs and "Traceback" not in logs
