"""Workaround: Ray Train V2 worker placement groups that outlive a Tune trial stopped early.

The Ray behaviour (Ray 2.60, ``ray.train.v2``): each trial function starts a TorchTrainer, whose
TrainController actor creates a placement group for its worker group. When Tune stops the trial
(ASHA, an error) it ends the trial's actor; the controller dies with it, so the controller's own
shutdown, which removes the group, never runs. The group itself belongs to the *job* (the sweep
driver), not to the controller, so Ray does not remove it either until the driver exits. Train's
guard for exactly this case, ``PlacementGroupCleanerCallback`` (``train/v2/_internal/callbacks/
placement_group_callback.py``), starts a detached ``PlacementGroupCleaner`` that learns of the
controller's death through the State API (``ray.util.state.get_actor``). That API is served by the
dashboard and its address is found by auto-detecting *the* local Ray instance, so the cleaner never
removes anything when Ray runs without its dashboard (our local Ray: ``include_dashboard=False``, or
a minimal install; every query fails and it keeps retrying) or when several Ray instances share a
host (auto-detection fails or picks another instance). The leaked group keeps the trial's worker
CPUs/GPUs reserved, and the next trial Tune admits waits for them forever.

The workaround: ``TrainReservationRecorder`` (a Train callback, in the trial's controller) records
the controller's actor id and its worker placement groups in the GCS key-value store;
``ReleaseStaleReservations`` (a Tune callback, in the sweep driver) removes any of them still
reserved once the trial is over and its controller is gone, asking the GCS actor table directly
(no dashboard needed).

It can be removed when Train's cleaner no longer depends on the dashboard-backed State API (or Train
ties the worker placement group's lifetime to its controller) in the Ray version we pin, or when
every sweep runs on a Ray with its dashboard as the only Ray instance on its host. Check by stopping
a trial early on a dashboard-less Ray: the next trial must start without ``released a stale Train
reservation`` in the log.
"""

from __future__ import annotations

import json
import time

from ray import tune as ray_tune
from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback

_KV_NAMESPACE = "stablerep_ray.tune"


def reservation_key(sweep: str, trial_id: str) -> bytes:
    return f"{sweep}/{trial_id}".encode()


def _kv_record(key: bytes) -> dict:
    from ray.experimental import internal_kv

    raw = internal_kv._internal_kv_get(key, namespace=_KV_NAMESPACE)
    return json.loads(raw) if raw else {}


class TrainReservationRecorder(ControllerCallback, WorkerGroupCallback):
    """Train V2 controller / worker-group callback (runs in the trial's TrainController): records the
    controller's actor id and each worker-group placement group under ``key``."""

    def __init__(self, key: bytes):
        self.key = key

    def _update(self, **changes) -> None:
        from ray.experimental import internal_kv

        record = _kv_record(self.key)
        if "pg" in changes:
            record.setdefault("pgs", []).append(changes.pop("pg"))
        record.update(changes)
        internal_kv._internal_kv_put(self.key, json.dumps(record), overwrite=True, namespace=_KV_NAMESPACE)

    def after_controller_start(self, train_run_context) -> None:
        import ray

        self._update(controller=ray.get_runtime_context().get_actor_id())

    def after_worker_group_start(self, worker_group) -> None:
        pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
        self._update(pg=pg.id.hex())


def _actor_alive(actor_id: str) -> bool:
    import ray

    info = ray._private.state.actors(actor_id=actor_id)  # GCS actor table: no dashboard needed
    return bool(info) and info.get("State") != "DEAD"


def _release(record: dict) -> float:
    """Remove the record's placement groups that still exist; returns the CPUs released."""
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup

    released = 0.0
    for pg_hex in record.get("pgs", []):
        pg = PlacementGroup(PlacementGroupID(bytes.fromhex(pg_hex)))
        table = ray.util.placement_group_table(pg)
        if table and table.get("state") not in (None, "REMOVED"):
            ray.util.remove_placement_group(pg)
            released += sum(b.get("CPU", 0) for b in table.get("bundles", {}).values())
    return released


class ReleaseStaleReservations(ray_tune.Callback):
    """Tune callback (sweep driver): once a trial is over and its TrainController has exited,
    remove the trial's Train worker placement groups that are still reserved."""

    def __init__(self, sweep: str, give_up_s: float = 120.0):
        self.sweep, self.give_up_s = sweep, give_up_s
        self.pending: dict[str, float] = {}
        self.released: list[tuple[str, float]] = []
        self._last_check = 0.0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.pending[trial.trial_id] = time.monotonic()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.pending[trial.trial_id] = time.monotonic()

    def on_step_begin(self, iteration, trials, **info):
        if self.pending and time.monotonic() - getattr(self, "_last_check", 0.0) > 2:
            self._last_check = time.monotonic()
            self.sweep_pending()

    def on_experiment_end(self, trials, **info):
        # No waiting here: once the driver's job ends, Ray removes the job's placement groups.
        self.sweep_pending()

    def sweep_pending(self) -> None:
        from ray.experimental import internal_kv

        for trial_id, since in list(self.pending.items()):
            key = reservation_key(self.sweep, trial_id)
            try:
                record = _kv_record(key)
                waited = time.monotonic() - since
                controller = record.get("controller")
                if controller and _actor_alive(controller) and waited < self.give_up_s:
                    continue  # still shutting down (a normal end removes its own group)
                if not record and waited < 10:
                    continue  # the record may still be on its way
                cpus = _release(record)
                if cpus:
                    self.released.append((trial_id, cpus))
                    print(f"released a stale Train reservation of trial {trial_id} ({cpus:g} CPUs)")
                internal_kv._internal_kv_del(key, namespace=_KV_NAMESPACE)
            except Exception as err:  # noqa: BLE001 - never let cleanup stop the sweep
                print(f"warning: could not check trial {trial_id}'s Train reservation: {err}")
            self.pending.pop(trial_id, None)
