"""The command as a terminal runs it: Ctrl-C reaches the whole foreground process group."""

import os
import signal
import subprocess
import time
from pathlib import Path


def ctrl_c_once(proc: subprocess.Popen, log: Path, text: str, timeout: float = 600) -> int:
    """SIGINT to ``proc``'s process group (started with ``start_new_session``) once ``log`` holds
    ``text``; its exit status. A process that does not stop within 300 s is killed."""
    try:
        deadline = time.monotonic() + timeout
        while text not in log.read_text(errors="replace") and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        return proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
