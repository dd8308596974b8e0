"""What every process of a run sets up first: Ray's known log noise dropped and nothing else; Ray Data's
scheduling loop paced where it runs, without importing Ray Data where it does not."""

import logging
import subprocess
import sys
import threading
import time

import ray.exceptions

from stablerep_ray import process_setup


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def log_with(name: str, message: str, error: BaseException | None = None) -> list[logging.LogRecord]:
    logger, handler = logging.getLogger(name), Collect()
    logger.addHandler(handler)
    try:
        try:
            if error:
                raise error
            logger.warning(message)
        except BaseException:
            logger.warning(message, exc_info=True)
    finally:
        logger.removeHandler(handler)
    return handler.records


def test_known_noise_goes_and_the_rest_stays():
    process_setup.quiet_ray_logs()
    assert not log_with(process_setup.DATA_PROGRESS_LOGGER, "Progress bars disabled. To enable, set ...")
    assert not log_with(process_setup.DATA_PROGRESS_LOGGER, "[dataset]: A new progress UI is available. To enable, ...")
    assert log_with(process_setup.DATA_PROGRESS_LOGGER, "Something else")
    assert not log_with(process_setup.DATA_EXECUTOR_LOGGER,
                        "\u2714\ufe0f  Dataset d_0 execution finished in 7.73 seconds")
    assert log_with(process_setup.DATA_EXECUTOR_LOGGER, "Execution plan of Dataset dataset_0: ...")
    assert not log_with(process_setup.PG_CLEANER_LOGGER, "Failed to query Ray Train Controller actor state. ...")
    # the timeout warning keeps its one line and loses its traceback; another error keeps both
    timeout = log_with(process_setup.AUTOSCALING_CLIENT_LOGGER, "Failed to send resource request",
                       ray.exceptions.GetTimeoutError("Get timed out"))
    assert len(timeout) == 1 and timeout[0].exc_info is None
    other = log_with(process_setup.AUTOSCALING_CLIENT_LOGGER, "Failed to send resource request", ValueError("bad"))
    assert other[0].exc_info is not None


def test_only_the_placement_group_cleaners_thread_dies_quietly():
    reported = []
    previous = threading.excepthook
    threading.excepthook = reported.append
    try:
        process_setup.quiet_ray_logs.__wrapped__()  # uncached: wraps the recording hook
        for name in (process_setup.PG_CLEANER_THREAD, "some-other-thread"):
            thread = threading.Thread(target=lambda: 1 / 0, name=name)
            thread.start()
            thread.join()
    finally:
        threading.excepthook = previous
    assert [args.thread.name for args in reported] == ["some-other-thread"]


def test_an_idle_data_executor_is_paced_and_a_waiting_one_is_not(monkeypatch):
    """Ray Data's scheduling loop spins while its consumers hold the stream back: the patched pass
    starts at most every MIN_LOOP_PERIOD_S, passes its arguments through, and adds nothing to a pass
    that already waited that long (a busy executor waiting on its tasks)."""
    from ray.data._internal.execution import streaming_executor

    calls = []
    monkeypatch.setattr(streaming_executor, "process_completed_tasks",
                        lambda topology, *args, **kwargs: calls.append((topology, args, kwargs)) or 0)
    process_setup.pace_idle_data_executor.__wrapped__()  # uncached: wraps the recording stand-in
    paced = streaming_executor.process_completed_tasks
    period = process_setup.MIN_LOOP_PERIOD_S

    start = time.perf_counter()
    for _ in range(6):
        assert paced("topology", "policies", max_errored_blocks=3) == 0
    assert time.perf_counter() - start >= 5 * period
    assert calls == [("topology", ("policies",), {"max_errored_blocks": 3})] * 6

    time.sleep(2 * period)
    start = time.perf_counter()
    paced("topology")
    assert time.perf_counter() - start < period


def test_ray_data_is_paced_once_imported_and_not_imported_for_it():
    """The worker set-up runs in every process Ray starts for a run: it leaves Ray Data unimported (a
    second of CPU and 110 MB in each), and paces the executor of a process that imports it later."""
    script = (
        "import sys\n"
        "from stablerep_ray.process_setup import setup_process\n"
        "setup_process()\n"
        "print('ray.data' in sys.modules)\n"
        "from ray.data._internal.execution import streaming_executor\n"
        "print(streaming_executor.process_completed_tasks.__qualname__)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "_pace.<locals>.paced"]
