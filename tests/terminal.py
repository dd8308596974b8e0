"""Stopping a command as people do: Ctrl-C in a terminal reaches the whole foreground process group;
`ray job stop`, `kill` and schedulers send SIGTERM to the process alone."""

import os
import signal
import subprocess
import time
from pathlib import Path

STOPS = {"ctrl-c": (signal.SIGINT, True), "sigterm": (signal.SIGTERM, False)}
DURATION = r"(\d+s|\d+m\d\ds|\d+h\d\dm)"  # console.duration: 12s, 1m06s, 1h02m


def stop_once(proc: subprocess.Popen, log: Path, text: str, how: str = "ctrl-c", timeout: float = 600,
              ready=lambda: True) -> int:
    """Once ``log`` holds ``text`` (and ``ready()`` holds), stop ``proc`` (started with
    ``start_new_session``) ``how``: "ctrl-c", SIGINT to its process group, or "sigterm", SIGTERM to it
    alone; its exit status. A process that does not stop within 300 s is killed."""
    sig, group = STOPS[how]
    try:
        deadline = time.monotonic() + timeout
        while (not (text in log.read_text(errors="replace") and ready()) and proc.poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.5)
        if group:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
        return proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
