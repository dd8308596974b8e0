"""Joining or starting Ray, and checking a run fits the cluster before anything is reserved."""

from __future__ import annotations

import functools
import logging
import os
import re
import signal
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

from .config import SYNTH_SOURCE, Config, ConfigError
from .config.base import QUOTED as QUOTED_CONFIG_ERROR
from .process_setup import WORKER_SETUP, setup_process

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Need:
    """Resources one training run holds at once: trainer workers + generator actors + caption reader."""

    cpus: float
    gpus: float

    @classmethod
    def of(cls, config: Config) -> Need:
        t, g, s = config.train, config.generator, _llm_pool(config)
        cpus = t.num_workers * t.num_cpus_per_worker + g.num_actors * g.num_cpus_per_actor + 1
        gpus = t.num_workers * (t.gpus_per_worker if t.use_gpu else 0) + g.num_actors * g.num_gpus_per_actor
        if s:
            cpus, gpus = cpus + s.num_actors * s.num_cpus_per_actor, gpus + s.num_actors * s.num_gpus_per_actor
        return cls(cpus, gpus)

    def describe(self, config: Config) -> str:
        t, g, s = config.train, config.generator, _llm_pool(config)
        llm = (f" + {s.num_actors} language-model actors x ({s.num_cpus_per_actor:g} CPU, "
               f"{s.num_gpus_per_actor:g} GPU)") if s else ""
        return (
            f"{t.num_workers} train workers x ({t.num_cpus_per_worker:g} CPU"
            f"{f', {t.gpus_per_worker:g} GPU' if t.use_gpu else ''}) + {g.num_actors} generator actors x "
            f"({g.num_cpus_per_actor:g} CPU, {g.num_gpus_per_actor:g} GPU){llm} + 1 CPU caption reader "
            f"= {self.cpus:g} CPUs, {self.gpus:g} GPUs"
        )


def _llm_pool(config: Config):
    """The caption-synthesis settings when a language-model actor pool runs beside the generators, else None."""
    synth = config.captions.synth
    return synth if config.captions.source == SYNTH_SOURCE and synth.uses_model else None


def ray_address(config: Config) -> str:
    return config.cluster.address or os.environ.get("RAY_ADDRESS", "")


def local_resources(config: Config) -> tuple[float, float]:
    cpus = config.cluster.num_cpus or os.cpu_count() or 1
    gpus = config.cluster.num_gpus
    if gpus < 0:
        import torch

        gpus = torch.cuda.device_count()
    return cpus, gpus


def check_fits(config: Config, cpus: float, gpus: float, where: str) -> None:
    """Raise a ConfigError naming the key to change when the run can never be placed."""
    need = Need.of(config)
    if need.gpus > gpus:
        key = "train.num_workers" if config.train.use_gpu else "generator.num_actors"
        raise ConfigError(
            f"{key}: the run needs {need.describe(config)}, but {where} has {gpus:g} GPUs; "
            f"lower train.num_workers / generator.num_actors or add GPUs"
        )
    if need.cpus > cpus:
        raise ConfigError(
            f"train.num_workers: the run needs {need.describe(config)}, but {where} has {cpus:g} CPUs; "
            f"lower train.num_workers / generator.num_actors"
            + ("" if ray_address(config) else " or raise cluster.num_cpus (logical CPUs of the local Ray)")
        )


def check_local_fit(config: Config) -> None:
    """Before starting a local Ray: does the run fit the resources it would be started with?"""
    if not ray_address(config):
        check_fits(config, *local_resources(config), where="the local Ray")


def init_ray(config: Config) -> None:
    """Join the cluster at cluster.address / RAY_ADDRESS, else start a local Ray; then check the fit."""
    import ray

    if not ray.is_initialized():
        address = ray_address(config)
        if address:
            start_ray(address)
        else:
            check_local_fit(config)
            cpus, gpus = local_resources(config)
            start_ray(num_cpus=int(cpus), num_gpus=int(gpus))
    check_fits(config, *cluster_capacity())
    configure_data_context()


def start_ray(address: str = "", num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Join ``address``, else start a local Ray without its dashboard (faster start, less memory).

    Ray's console is kept to what concerns the run: its INFO lines ("Started a local Ray instance",
    ...) only with ``--verbose``, and the known noise of ``quiet_ray_logs`` dropped here and, on a
    local Ray, in every worker.
    """
    import ray

    from .console import verbose

    level = logging.INFO if verbose() else logging.WARNING
    setup_process()
    if address:
        field = "RAY_ADDRESS" if address == os.environ.get("RAY_ADDRESS") else "cluster.address"
        check_reachable(address, field)
        try:
            ray.init(address=address, logging_level=level, runtime_env=WORKER_SETUP)
        except ConnectionError as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(f"{field}: could not join Ray at {address!r} ({reason}); {_ADDRESS_HELP}") from None
    else:
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, logging_level=level,
                 runtime_env=WORKER_SETUP)
    if not verbose():
        drop_forwarded_noise()


@contextmanager
def sigterm_as_ctrl_c():
    """While active, SIGTERM (``ray job stop``, ``kill``, a scheduler's pre-emption) ends the command as
    Ctrl-C does: it raises SIGINT, so Ray Train or Tune, whichever handler is installed, stops the run
    cleanly and the command says where it got to. The handler it replaces is the one ``ray.init`` sets
    in a driver, ``sys.exit(15)``: Ray Train's abort and Tune's save never ran, and the C++ handler
    Ray's core installs beside it printed a stack dump first.

    Enter it after ``ray.init``, which would otherwise replace it."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers: main thread only
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: signal.raise_signal(signal.SIGINT))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


_ADDRESS_HELP = (
    "start the cluster (`ray up cluster.yaml`, or `ray start --head` on the head node) or fix the address: "
    "ray://HEAD:10001 from outside the cluster, HEAD:6379 or auto on one of its nodes, empty for a local Ray"
)
_DEFAULT_PORTS = {"": 6379, "ray": 10001}  # the GCS port and the Ray Client server port


def check_reachable(address: str, field: str, timeout_s: float = 10.0) -> None:
    """Fail in seconds when nothing listens at ``address``: ``ray.init`` would retry it for minutes."""
    scheme = address.split("://")[0] if "://" in address else ""
    if scheme not in _DEFAULT_PORTS or address in ("auto", "local"):
        return  # auto / local / other schemes: ray.init resolves them, and its ConnectionError is caught
    try:
        parts = urlsplit(address if scheme else f"//{address}")
        host, port = parts.hostname, parts.port or _DEFAULT_PORTS[scheme]
    except ValueError as err:
        raise ConfigError(f"{field}: {address!r} is not HOST:PORT ({err}); {_ADDRESS_HELP}") from None
    if not host:
        raise ConfigError(f"{field}: {address!r} names no host; {_ADDRESS_HELP}")
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as err:
        reason = err.strerror or str(err) or type(err).__name__
        raise ConfigError(f"{field}: nothing answers at {host}:{port} ({reason}); {_ADDRESS_HELP}") from None


def quiet_model_loading() -> None:
    """Turn off the tqdm bars of Hub downloads and transformers' weight loading and saving in a process
    about to load or save a model: from every actor at once they are a wall of redraws in the console and
    in job logs.
    The loaders print one line when the model is ready instead (the diffusers one also turns off
    diffusers' own bar: importing diffusers here would cost a caption actor 2 s)."""
    import huggingface_hub.utils
    import transformers.utils.logging

    huggingface_hub.utils.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def say_model_ready(stage: str, model: str, loaded: object, device, dtype, started: float) -> None:
    """The one line a loader prints: which model, its class, where, in which dtype, after how long."""
    print(f"{stage}: {model} ({type(loaded).__name__}) ready on {device}, {str(dtype).removeprefix('torch.')}, "
          f"in {time.perf_counter() - started:.1f} s", flush=True)


# Lines that Ray's raylet and C++ core workers write to their own stderr, which the driver forwards
# (no Python logger to filter): a sweep starting many actors at once makes the raylet warn about its
# worker start-up concurrency, and every actor restartable with object-store arguments (Ray Train's
# controller, Ray Data's split coordinator) logs ray-project/ray#53727 at start, and when a run ends Ray
# Data's teardown of the generator pool (ray.kill) makes the raylet report the task it had queued on
# the killed actor as a failed submit to be retried; so does an actor that dies while starting (its
# error is said elsewhere) for Ray Data's query of where it runs. Ray Data's split coordinator logs
# that the training stream finished, at INFO, also with progress bars off: the summary after it says
# more. When a task of the stream fails, it logs that the stream aborts and that
# DataContext.max_errored_blocks would skip failed blocks (a run must not lose groups silently); the
# error itself reaches the command, which says it. None of them is about the run.
FORWARDED_NOISE = (
    "PYTHON worker processes have been started on node",
    "has constructor arguments in the object store and max_restarts > 0",
    "The actor is dead because it was killed by `ray.kill`",
    "get_location failed. There are infinite retries remaining, so the task will be retried. Error: The "
    "actor is temporarily unavailable",
    "execution finished in",
    "Dataset execution will now abort. To ignore this exception and continue, set DataContext.max_errored_blocks.",
)


# Ray ends a job's workers with SIGTERM when the job's driver leaves a long-lived cluster (a sweep
# stopped by Ctrl-C, trial workers still importing), and their C++ failure-signal handler prints where
# each was: a header, then stack frames, each also repeated with a logging.cc prefix. Deliberate, and
# a screen of hex after the summary; frames are dropped only from a process that printed the header.
SIGTERM_HEADER = "*** SIGTERM received at time="
STACK_FRAME = re.compile(r"(^|PC: |logging\.cc:\d+: )\s*@\s+(0x[0-9a-f]+|\.\.\. and at least \d+ more frames)")


# abseil's mutex event tracing ("[mutex.cc : 452] RAW: Lock blocking 0x... @ 0x..."): a lock's every
# step, which a worker now and then prints (a Ray Data metadata task of `eval`, seen on 2026-11-29 as
# the first lines of its console), about nothing the run did.
MUTEX_TRACE = re.compile(r"\[mutex\.cc : \d+\] RAW: (Reader)?(Try)?(Lock|Unlock|Wait|Signal)")


def without_noise(lines: list[str], terminated: bool = False) -> tuple[list[str], bool]:
    """``lines`` of one process less those holding a ``FORWARDED_NOISE`` phrase, mutex tracing and its
    SIGTERM stack, and whether it has printed a SIGTERM header (``terminated``: so far). A batch that quotes a
    ConfigError (the traceback of an actor or worker that refused the config, and every process it
    took down with it) is dropped whole: the command ends by saying that error in one line."""
    if any(QUOTED_CONFIG_ERROR.search(line) for line in lines):
        return [], terminated
    kept = []
    for line in lines:
        terminated = terminated or SIGTERM_HEADER in line
        if not (any(phrase in line for phrase in FORWARDED_NOISE) or SIGTERM_HEADER in line
                or MUTEX_TRACE.search(line) or (terminated and STACK_FRAME.search(line))):
            kept.append(line)
    return kept, terminated


def drop_forwarded_noise() -> None:
    """Wrap the driver's printers of forwarded output so ``FORWARDED_NOISE`` lines and SIGTERM stacks
    are dropped: the dispatcher of worker logs, and the printer the raylet's warnings (published as
    error messages, such as the worker start-up one) reach directly.

    Ray has no public hook for this; both live in ``ray._private``. Where they move in a later Ray,
    nothing is filtered and the lines show, as they did before.
    """
    try:
        import ray._private.worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return

    terminated: set = set()  # processes that printed a SIGTERM header

    def filtered(handler):
        def handle(data: dict) -> None:
            pid = data.get("pid")
            lines, stopped = without_noise(data.get("lines", []), pid in terminated)
            if stopped:
                terminated.add(pid)
            if lines:
                handler({**data, "lines": lines})

        handle.unfiltered = handler
        return handle

    with dispatcher._lock:
        dispatcher.handlers = [(name, h if hasattr(h, "unfiltered") else filtered(h))
                               for name, h in dispatcher.handlers]
    printer = getattr(ray_worker, "print_to_stdstream", None)
    if printer is not None and not hasattr(printer, "unfiltered"):
        def print_to_stdstream(data: dict, *args, **kwargs) -> None:
            filtered(functools.partial(printer, *args, **kwargs))(data)

        print_to_stdstream.unfiltered = printer
        ray_worker.print_to_stdstream = print_to_stdstream


def cluster_capacity() -> tuple[float, float, str]:
    """(CPUs, GPUs, description) the connected cluster has or can autoscale to.

    With an autoscaler (``ray up``), worker types may start at zero nodes: their ``max_workers``
    count (as Ray Train's own check does), not only the nodes that are up now.
    """
    import ray

    now = ray.cluster_resources()
    cpus, gpus = now.get("CPU", 0), now.get("GPU", 0)
    try:
        most = ray._private.state.state.get_max_resources_from_cluster_config() or {}
    except Exception:  # noqa: BLE001 - no autoscaler config (local Ray, manual `ray start`)
        most = {}
    if most.get("CPU", 0) > cpus or most.get("GPU", 0) > gpus:
        return (max(cpus, most.get("CPU", 0)), max(gpus, most.get("GPU", 0)),
                "the cluster (autoscaling to its max_workers)")
    return cpus, gpus, "the cluster"


def configure_data_context() -> None:
    """Ray Data options of this process, which Train hands on to the stream's executor.

    Progress bars: one compact bar in a terminal; none where output is a file, ``ray job logs`` or
    CI, where every redraw of every operator's bar is a new line (98 % of a quickstart's output).
    """
    import ray.data

    from .console import interactive, verbose

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = interactive() or verbose()
    ctx.enable_operator_progress_bars = verbose()
    ctx.print_on_execution_start = verbose()
    # Fail fast (instead of hanging) when generator actors cannot be placed.
    ctx.wait_for_min_actors_s = 600
