"""Ray's known console noise is dropped, and nothing else: other records and thread errors still show."""

import logging
import threading

import ray.exceptions

from stablerep_ray import runtime


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
    runtime.quiet_ray_logs()
    assert not log_with(runtime.DATA_PROGRESS_LOGGER, "Progress bars disabled. To enable, set ...")
    assert log_with(runtime.DATA_PROGRESS_LOGGER, "Something else")
    assert not log_with(runtime.PG_CLEANER_LOGGER, "Failed to query Ray Train Controller actor state. ...")
    # the timeout warning keeps its one line and loses its traceback; another error keeps both
    timeout = log_with(runtime.AUTOSCALING_CLIENT_LOGGER, "Failed to send resource request",
                       ray.exceptions.GetTimeoutError("Get timed out"))
    assert len(timeout) == 1 and timeout[0].exc_info is None
    other = log_with(runtime.AUTOSCALING_CLIENT_LOGGER, "Failed to send resource request", ValueError("bad"))
    assert other[0].exc_info is not None


def test_only_the_placement_group_cleaners_thread_dies_quietly():
    reported = []
    previous = threading.excepthook
    threading.excepthook = reported.append
    try:
        runtime.quiet_ray_logs.__wrapped__()  # uncached: wraps the recording hook
        for name in (runtime.PG_CLEANER_THREAD, "some-other-thread"):
            thread = threading.Thread(target=lambda: 1 / 0, name=name)
            thread.start()
            thread.join()
    finally:
        threading.excepthook = previous
    assert [args.thread.name for args in reported] == ["some-other-thread"]
