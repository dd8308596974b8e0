"""Joining or starting Ray, and checking a run fits the cluster before anything is reserved."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from .config import Config, ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Need:
    """Resources one training run holds at once: trainer workers + generator actors + caption reader."""

    cpus: float
    gpus: float

    @classmethod
    def of(cls, config: Config) -> Need:
        t, g = config.train, config.generator
        cpus = t.num_workers * t.num_cpus_per_worker + g.num_actors * g.num_cpus_per_actor + 1
        gpus = t.num_workers * (1 if t.use_gpu else 0) + g.num_actors * g.num_gpus_per_actor
        return cls(cpus, gpus)

    def describe(self, config: Config) -> str:
        t, g = config.train, config.generator
        return (
            f"{t.num_workers} train workers x ({t.num_cpus_per_worker:g} CPU"
            f"{', 1 GPU' if t.use_gpu else ''}) + {g.num_actors} generator actors x "
            f"({g.num_cpus_per_actor:g} CPU, {g.num_gpus_per_actor:g} GPU) + 1 CPU caption reader "
            f"= {self.cpus:g} CPUs, {self.gpus:g} GPUs"
        )


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
            ray.init(address=address)
        else:
            check_local_fit(config)
            cpus, gpus = local_resources(config)
            ray.init(num_cpus=int(cpus), num_gpus=int(gpus), include_dashboard=False,
                     runtime_env={"worker_process_setup_hook": "stablerep_ray.runtime.quiet_without_dashboard"})
    check_fits(config, *cluster_capacity())
    configure_data_context()


PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_without_dashboard() -> None:
    """Worker setup hook of the local Ray, which runs without its dashboard (faster start, less memory).

    Ray Train's placement-group cleaner asks the state API, which the dashboard serves, every second
    whether the Train controller is alive, and logs a warning on each failed query (one line a second
    of training). It only matters when a controller dies on a long-lived cluster; a local Ray removes
    its placement groups when the driver exits.
    """
    logging.getLogger(PG_CLEANER_LOGGER).addFilter(
        lambda record: "Failed to query Ray Train Controller actor state" not in record.getMessage()
    )


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
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    # Fail fast (instead of hanging) when generator actors cannot be placed.
    ctx.wait_for_min_actors_s = 600
