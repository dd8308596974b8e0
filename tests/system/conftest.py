"""Fixtures shared by the system tests."""

import pytest


@pytest.fixture(scope="module")
def local_ray():
    """One real local Ray for a test module, set up as a run sets up its own: 8 logical CPUs (what
    the configs' ``cluster.num_cpus`` asks for), every process through ``process_setup.setup_process``, the
    stream's DataContext, no progress bars."""
    import ray

    from stablerep_ray.process_setup import WORKER_SETUP, setup_process
    from stablerep_ray.runtime import configure_data_context

    setup_process()
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, runtime_env=WORKER_SETUP)
    configure_data_context()
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()
