"""A private Ray head for tests that need a real cluster address (`ray job submit`, a sweep driver
killed and resumed): `ray start --head --block` in its own temp dir with its own auth token.

Stopping it stops exactly this instance, never other Ray instances on the host (no `ray stop`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
RAY = VENV_BIN / "ray"


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any RAY_ADDRESS / RAY_AUTH_* of the caller, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(
        RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",  # else `uv run` makes Ray build a venv per worker
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


def processes_of(marker: str) -> list[int]:
    """Pids (not ours) whose command line or working directory mentions ``marker`` (our temp dir)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if marker in cmdline or cwd.startswith(marker):
            pids.append(int(proc.name))
    return pids


class LocalHead:
    """``ray start --head --block`` on loopback with ``num_cpus`` logical CPUs and no GPU.

    ``env`` and ``args`` add to the head's environment (which its workers inherit) and command line.
    """

    def __init__(self, workdir: Path, num_cpus: float = 8, env: dict[str, str] | None = None,
                 args: tuple[str, ...] = ()):
        self.temp_dir = tempfile.mkdtemp(prefix="srt", dir="/tmp")  # short: unix socket paths
        self.token = secrets.token_hex(32)
        token_file = workdir / "auth_token"
        token_file.write_text(self.token)
        (port,) = free_ports(1)
        self.address = f"127.0.0.1:{port}"
        self.env = clean_env(
            # `python` in a job's entrypoint must be this venv's python.
            PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            # 2.60: token auth. `ray start` turns it on only when a token exists (or RAY_AUTH_MODE=token)
            # and clients send the token only when RAY_AUTH_MODE=token: pin both to a private token so
            # the test neither depends on nor touches ~/.ray/auth_token.
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(token_file),
            # SIGTERM on `ray start --block` first drains the node (30 s by default): skip it.
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
            RAY_raylet_start_wait_time_s="300",  # a loaded shared machine starts slowly
            # Reaches every worker and driver: with several Ray instances on one host, Ray's own
            # address auto-detection (State API clients) would otherwise refuse to choose.
            RAY_ADDRESS=self.address,
            **(env or {}),
        )
        self.log = open(workdir / "ray_head.log", "w")  # noqa: SIM115 - the head's log for its lifetime
        self.proc = subprocess.Popen(
            [str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
             f"--num-cpus={num_cpus:g}", "--num-gpus=0", f"--temp-dir={self.temp_dir}",
             "--disable-usage-stats", *args],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}: {self.tail()}")
            if ready():
                return
            time.sleep(1)
        raise TimeoutError(f"{what} not ready after {timeout}s: {self.tail()}")

    def started(self) -> bool:
        return "Ray runtime started" in Path(self.log.name).read_text(errors="replace")

    def tail(self, n: int = 40) -> str:
        self.log.flush()
        return "\n".join(Path(self.log.name).read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # --block: the node shuts down its processes
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # our own session only
                self.proc.wait(timeout=10)
        for _ in range(20):  # stragglers of this instance only (workers, job drivers), by pid
            pids = processes_of(self.temp_dir)
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(OSError):  # already gone
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
