"""Ray's known console noise is dropped, and nothing else; a cluster address nothing answers at fails fast;
SIGTERM stops a run as Ctrl-C does."""

import os
import signal
import socket
import time

import pytest

from stablerep_ray import runtime
from stablerep_ray.config import ConfigError


def test_forwarded_worker_noise_goes_and_the_rest_stays():
    """The lines Ray forwards from its raylet and C++ workers pass through the real dispatcher: known
    noise is dropped, other lines of the same batch still reach Ray's printer, wrapping is idempotent."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    printed: list[dict] = []
    saved = list(dispatcher.handlers)
    dispatcher.handlers = [("ray_print_logs", printed.append)]
    try:
        runtime.drop_forwarded_noise()
        runtime.drop_forwarded_noise()
        noise = [
            "WARNING: 16 PYTHON worker processes have been started on node: abc with address: 1.2.3.4. ...",
            "[2026-11-27 20:33:09,911 E 30835 30895] core_worker.cc:2465: Actor with class name: "
            "'PreemptionWatcher' and ID: '7dfa' has constructor arguments in the object store and "
            "max_restarts > 0. If the arguments in the object store go out of scope ...",
            "Task MapWorker(MapBatches(GeneratorActor)).submit failed. There are infinite retries "
            "remaining, so the task will be retried. Error: The actor is dead because it was killed by "
            "`ray.kill`.",
            "Task MapWorker(MapBatches(GeneratorActor)).get_location failed. There are infinite retries "
            "remaining, so the task will be retried. Error: The actor is temporarily unavailable: RpcError: "
            "RPC error: Cancelling all calls rpc_code: 14",
            "\x1b[36m(SplitCoordinator pid=13025)\x1b[0m \u2714\ufe0f  Dataset train_0355RT_0 execution finished in "
            "123.38 seconds",
            "\x1b[36m(SplitCoordinator pid=16779)\x1b[0m An exception was raised from a task of operator "
            '"MapBatches(GeneratorActor)". Dataset execution will now abort. To ignore this exception and continue, '
            "set DataContext.max_errored_blocks.",
            "[mutex.cc : 452] RAW: Lock blocking 0x55695ca90cd0   @ 0x7f335362b1a2 0x7f33526fb23c 0x7f3352fc2022",
            "[mutex.cc : 452] RAW: Lock returning 0x55695ca90cd0   @ 0x7f335362b1a2 0x7f33526fb23c",
            "[mutex.cc : 452] RAW: Unlock 0x55695ca90cd0   @ 0x7f3352fc2037 0x7f335364c3b0",
            "[mutex.cc : 452] RAW: ReaderTryLock succeeded 0x55695ca90cd0   @ 0x7f3352fc2037",
        ]
        dispatcher.emit({"pid": "raylet", "is_err": True, "lines": noise})
        dispatcher.emit({"pid": 7, "is_err": True, "lines": [noise[1], "Traceback: a real error"]})
    finally:
        dispatcher.handlers = saved
    assert [d["lines"] for d in printed] == [["Traceback: a real error"]]
    assert printed[0]["pid"] == 7


def test_the_stack_of_a_worker_ended_by_sigterm_goes_and_a_crash_stays():
    """Ray's failure-signal handler in workers a departing driver's job ends: header and frames (also
    with a logging.cc prefix, also in a later batch) go; a SIGSEGV keeps its frames."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    printed: list[dict] = []
    saved = list(dispatcher.handlers)
    dispatcher.handlers = [("ray_print_logs", printed.append)]
    prefix = "[2026-11-29 02:34:15,000 E 21117 21117] logging.cc:474: "
    try:
        runtime.drop_forwarded_noise()
        dispatcher.emit({"pid": 5, "is_err": True, "lines": [
            "*** SIGTERM received at time=1795919654 on cpu 1 ***",
            "PC: @     0x7fc8c12c668b  (unknown)  __Pyx_InitConstants()",
            "    @     0x7fcad285a050  1749584480  (unknown)",
            f"{prefix}*** SIGTERM received at time=1795919654 on cpu 1 ***",
        ]})
        dispatcher.emit({"pid": 5, "is_err": True, "lines": [
            f"{prefix}PC: @     0x7fc8c12c668b  (unknown)  __Pyx_InitConstants()",
            f"{prefix}    @     0x7fc8c124ce20        464  __pyx_pymod_exec_lib()",
            "    @ ... and at least 1 more frames",
            f"{prefix}    @ ... and at least 3 more frames",
            "a line of its own",
        ]})
        crash = ["*** SIGSEGV received at time=1795919654 on cpu 0 ***",
                 "PC: @     0x7f504c78b88b  (unknown)  (unknown)", "    @     0x7f504c65a050  (unknown)  (unknown)"]
        dispatcher.emit({"pid": 6, "is_err": True, "lines": crash})
    finally:
        dispatcher.handlers = saved
    assert [(d["pid"], d["lines"]) for d in printed] == [(5, ["a line of its own"]), (6, crash)]


def test_raylet_warnings_sent_as_error_messages_are_filtered_too(capsys):
    """The raylet's worker start-up warning reaches the driver as an error message, printed by
    ``ray._private.worker.print_to_stdstream`` directly, not through the dispatcher."""
    import ray._private.worker as ray_worker

    saved = ray_worker.print_to_stdstream
    original = getattr(saved, "unfiltered", saved)  # an earlier test may have wrapped it already
    try:
        runtime.drop_forwarded_noise()
        runtime.drop_forwarded_noise()
        assert ray_worker.print_to_stdstream.unfiltered is original  # wrapped once
        for line in ("WARNING: 8 PYTHON worker processes have been started on node: abc ...", "a real warning"):
            ray_worker.print_to_stdstream({"lines": [line], "pid": "raylet", "is_err": False},
                                          ignore_prefix=False)
    finally:
        ray_worker.print_to_stdstream = saved
    out = capsys.readouterr().out
    assert "a real warning" in out and "PYTHON worker processes" not in out


def closed_port() -> int:
    """A local port nothing listens on: bound once to learn a free number, then closed."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("address", ["127.0.0.1:{port}", "ray://127.0.0.1:{port}"])
def test_an_address_nothing_answers_at_fails_in_seconds(address, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    port = closed_port()
    start = time.monotonic()
    with pytest.raises(ConfigError, match=rf"^cluster.address: nothing answers at 127.0.0.1:{port} .*ray up"):
        runtime.start_ray(address.format(port=port))
    assert time.monotonic() - start < 5  # ray.init itself retried such an address for over 5 minutes


def test_the_address_error_names_where_the_address_came_from(monkeypatch):
    address = f"127.0.0.1:{closed_port()}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    with pytest.raises(ConfigError, match=r"^RAY_ADDRESS: nothing answers"):
        runtime.start_ray(address)
    with pytest.raises(ConfigError, match=r"^cluster.address: '10.0.0.1:abc' is not HOST:PORT"):
        runtime.check_reachable("10.0.0.1:abc", "cluster.address")


def test_sigterm_reaches_whichever_ctrl_c_handler_is_installed():
    """``ray job stop`` sends SIGTERM: inside ``sigterm_as_ctrl_c`` it runs the SIGINT handler (Ray Train's or
    Tune's during a run, else Python's KeyboardInterrupt); outside, the earlier SIGTERM handler is back."""
    before = signal.getsignal(signal.SIGTERM)
    seen = []
    # set both ways here: an in-process fit earlier in the session leaves Ray Train's handler installed
    previous_sigint = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        with runtime.sigterm_as_ctrl_c():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # Python runs signal handlers between bytecodes of the main thread
        assert seen == [signal.SIGINT]
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with pytest.raises(KeyboardInterrupt), runtime.sigterm_as_ctrl_c():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    finally:
        signal.signal(signal.SIGINT, previous_sigint)
    assert signal.getsignal(signal.SIGTERM) is before


def test_forwarded_tracebacks_of_a_refused_config_go_whole():
    """An actor that refused the config, and each process it took down, prints a traceback ending in
    the ConfigError: the command says it once, so those batches go, and an unrelated one stays."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    printed: list[dict] = []
    saved = list(dispatcher.handlers)
    dispatcher.handlers = [("ray_print_logs", printed.append)]
    refused = ["Traceback (most recent call last):", '  File "stablerep_ray/generation/diffusion.py", line 1',
               "stablerep_ray.config.base.ConfigError: generator.model: x is gated; accept its terms"]
    try:
        runtime.drop_forwarded_noise()
        dispatcher.emit({"pid": 3, "is_err": True, "lines": ["Error in training function:", *refused]})
        dispatcher.emit({"pid": 4, "is_err": True, "lines": ["Traceback (most recent call last):", "ValueError: 1"]})
    finally:
        dispatcher.handlers = saved
    assert [(d["pid"], d["lines"]) for d in printed] == [(4, ["Traceback (most recent call last):", "ValueError: 1"])]
