"""What every process of a run sets up first: the driver directly, each Ray worker through
``WORKER_SETUP`` (Ray's ``worker_process_setup_hook``).

The hook runs in every worker process Ray starts for the job, so this module imports nothing beyond
the standard library, and paces Ray Data's executor when, and only where, its module is imported:
Train's and Ray Data's own actors import it anyway, but a process that does not (Train's queue, Ray
Data's actor-location tracker, a worker that runs plain tasks) was made to, for about 65 MB and a
second of CPU each (quickstart: 6.29 -> 6.19 GB across its 20 Ray processes).
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import logging
import sys
import threading
import time
from collections.abc import Callable
from types import ModuleType

# Every process of the run's Ray job runs it when it starts (merged with a `ray job submit` runtime_env).
WORKER_SETUP = {"worker_process_setup_hook": "stablerep_ray.process_setup.setup_process"}


def setup_process() -> None:
    """What the driver and every Ray worker of a run set up first: quiet logs, a paced data executor."""
    quiet_ray_logs()
    pace_idle_data_executor()


def after_import(name: str, then: Callable[[ModuleType], None]) -> None:
    """Call ``then(module)`` on module ``name``: now if it is imported, else right after its code has
    run, the first time anything imports it."""
    module = sys.modules.get(name)
    if module is not None:
        then(module)
    else:
        sys.meta_path.insert(0, _AfterImport(name, then))


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds ``name`` as the path finder would, with a loader that calls ``then`` once the module's code
    has run; then steps aside."""

    def __init__(self, name: str, then: Callable[[ModuleType], None]):
        self.name, self.then = name, then

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_then(module: ModuleType) -> None:
            exec_module(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            self.then(module)

        spec.loader.exec_module = exec_then
        return spec


# Ray Data's streaming executor (in the driver, or in the split coordinator actor that feeds Train)
# polls its tasks with ray.wait(timeout=0.1 s), which returns at once when a task's output is ready.
# When the consumers hold the stream back (the steady state whenever generation outpaces training),
# the generator's finished output stays ready and unread, and the executor re-plans in a tight loop:
# on a 2-core machine the split coordinator took as much CPU as a trainer worker. Each executor thread
# now starts a scheduling pass at most every MIN_LOOP_PERIOD_S; a busy executor, whose passes wait for
# tasks, is not slowed.
MIN_LOOP_PERIOD_S = 0.02
DATA_EXECUTOR_MODULE = "ray.data._internal.execution.streaming_executor"
_last_pass = threading.local()


@functools.cache  # once per process
def pace_idle_data_executor() -> None:
    after_import(DATA_EXECUTOR_MODULE, _pace)


def _pace(streaming_executor: ModuleType) -> None:
    process_completed_tasks = streaming_executor.process_completed_tasks

    def paced(*args, **kwargs):
        wait = getattr(_last_pass, "t", 0.0) + MIN_LOOP_PERIOD_S - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        _last_pass.t = time.perf_counter()
        return process_completed_tasks(*args, **kwargs)

    streaming_executor.process_completed_tasks = paced


AUTH_SETUP_LOGGER = "ray._private.authentication.authentication_token_setup"
PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
AUTOSCALING_CLIENT_LOGGER = "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client"
PG_CLEANER_THREAD = "PlacementGroupCleanerMonitor"
DATA_PROGRESS_LOGGER = "ray.data._internal.progress"
DATA_EXECUTOR_LOGGER = DATA_EXECUTOR_MODULE


@functools.cache  # once per process
def quiet_ray_logs() -> None:
    """Drops Ray log lines that say nothing about the run (the driver's, and a local Ray's workers':
    their setup hook).

    Ray Train's placement-group cleaner asks the state API, which the dashboard serves, every second
    whether the Train controller is alive, and logs a warning on each failed query (one line a second of
    training): the local Ray runs without its dashboard (faster start, less memory). When several Ray
    instances share the host, its monitor thread dies instead, with a traceback, on the first query. It
    only matters when a controller dies on a long-lived cluster; a local Ray removes its placement
    groups when the driver exits. Ray Data warns that progress bars are off, which
    ``configure_data_context`` chose on purpose, and in a terminal advertises its other progress UI. On
    a busy machine, Train's controller warns every 20 s that a resource request to Ray's autoscaling
    coordinator timed out (harmless, it says, when transient): the warning stays, its 17-line traceback
    of the timeout goes. A new local Ray turns token authentication on by default, the safe default, and
    warns that it did. Ray Data says at INFO that a dataset's execution finished (the training stream's
    end, evaluation's feature pass), where our summary says more.
    """
    logging.getLogger(AUTH_SETUP_LOGGER).addFilter(
        lambda record: not record.getMessage().startswith("Token authentication is enabled")
    )
    logging.getLogger(PG_CLEANER_LOGGER).addFilter(
        lambda record: "Failed to query Ray Train Controller actor state" not in record.getMessage()
    )
    logging.getLogger(DATA_PROGRESS_LOGGER).addFilter(
        lambda record: not record.getMessage().startswith(("Progress bars", "[dataset]: A new progress UI"))
    )
    logging.getLogger(DATA_EXECUTOR_LOGGER).addFilter(
        lambda record: "execution finished in" not in record.getMessage()
    )
    logging.getLogger(AUTOSCALING_CLIENT_LOGGER).addFilter(_without_timeout_traceback)
    report = threading.excepthook

    def excepthook(args: threading.ExceptHookArgs) -> None:
        if args.thread is None or args.thread.name != PG_CLEANER_THREAD:
            report(args)

    threading.excepthook = excepthook


def _without_timeout_traceback(record: logging.LogRecord) -> bool:
    import ray.exceptions

    if record.exc_info and isinstance(record.exc_info[1], ray.exceptions.GetTimeoutError):
        record.exc_info = record.exc_text = None
    return True
