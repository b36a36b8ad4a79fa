"""The one module that talks to Ray (pinned: ``ray[data]==2.60.0``; its API moves between versions).

A pool of model-holding actors (:class:`pipeline.worker.SegmentWorker`) is fed batches of slices
from a lazy iterator: each actor holds at most ``queue_depth`` batches, so the driver reads the
next batch while actors compute and memory stays bounded whatever the cohort size. Results come
back in completion order; a dead actor turns its batch into an error result (the case fails, the
run goes on).

Why actors and not ``ray.data.map_batches``: batches here never cross a case (so the output of a
case does not depend on its neighbours, and a resumed run reproduces an uninterrupted one bit for
bit), the driver stays the only reader of the input and the only writer of the output (no shared
file system needed on a cluster), and start-up costs one actor per model replica, nothing more.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from .worker import ModelSpec, SegmentWorker, SliceBatchResult, SliceTask

__all__ = ["PoolConfig", "ActorPool", "ModelLoadError", "ray_session", "resolve_pool"]

log = logging.getLogger(__name__)


class ModelLoadError(ValueError):
    """The actors failed to load the model (bad checkpoint, missing SAM weights...)."""


@dataclass(frozen=True)
class PoolConfig:
    """Actor pool resources. ``None`` fields are resolved from the cluster's resources.

    Attributes:
        num_actors: model replicas; default one per GPU (``gpus_per_actor`` each), or one per
            4 CPUs (at least 1) on CPU-only clusters.
        gpus_per_actor: default 1 when the cluster has GPUs, else 0.
        cpus_per_actor: default 1 on GPU, else the cluster's CPUs / actors (torch threads).
        queue_depth: batches queued per actor (2: one computing, one waiting).
    """

    num_actors: int | None = None
    gpus_per_actor: float | None = None
    cpus_per_actor: float | None = None
    queue_depth: int = 2
    chunk: int = 8


@contextmanager
def ray_session(address: str | None, num_cpus: int | None = None) -> Iterator[dict[str, float]]:
    """Join the cluster at ``address`` or start a private local Ray; always shut down after.

    Yields the cluster's resources (``{"CPU": 2.0, "GPU": 0.0, ...}``). The local default
    uses ``address="local"`` so a cluster someone else started on this machine is never joined
    by accident.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        _token_auth_if_available()  # before Ray reads its configuration on import
    import ray

    t0 = time.perf_counter()
    if address:
        ray.init(address=address, log_to_driver=False)
        where = f"cluster at {address}"
    else:
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1,
                 include_dashboard=False, log_to_driver=False)
        where = "local Ray"
    try:
        resources = {k: float(v) for k, v in ray.cluster_resources().items()}
        log.info("joined %s in %.1f s: %s CPUs, %s GPUs", where, time.perf_counter() - t0,
                 resources.get("CPU", 0), resources.get("GPU", 0))
        yield resources
    finally:
        ray.shutdown()


def _token_auth_if_available() -> None:
    """Send this user's Ray auth token when joining a cluster.

    ``ray start --head`` (Ray >= 2.5x) enables token authentication and keeps the token in
    ``~/.ray/auth_token``, but a driver joining with ``ray.init(address=...)`` only sends it when
    ``RAY_AUTH_MODE=token``. An explicit ``RAY_AUTH_MODE`` is respected as it is.
    """
    if "RAY_AUTH_MODE" in os.environ:
        return
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(token_file):
        log.info("joining with Ray token authentication (RAY_AUTH_MODE=token)")
        os.environ["RAY_AUTH_MODE"] = "token"


def resolve_pool(config: PoolConfig, resources: dict[str, float], n_batches: int) -> PoolConfig:
    """Fill the ``None`` fields of ``config`` from the cluster's resources."""
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 1.0)
    gpa = config.gpus_per_actor if config.gpus_per_actor is not None else (1.0 if gpus else 0.0)
    if gpa < 0 or (gpa > 0 and gpa > gpus):
        raise ValueError(f"--gpus-per-actor {gpa} asks for more GPUs than the cluster has ({gpus})")
    if config.num_actors is not None:
        n = config.num_actors
    elif gpa > 0:
        n = int(gpus // gpa)
    else:
        n = max(1, int(cpus // 4))
    if n < 1:
        raise ValueError(f"--num-actors must be at least 1, got {n}")
    n = max(1, min(n, n_batches))
    cpa = config.cpus_per_actor
    if cpa is None:
        cpa = 1.0 if gpa > 0 else max(1.0, float(int(cpus // n)))
    return PoolConfig(n, gpa, cpa, config.queue_depth, config.chunk)


class ActorPool:
    """``num_actors`` Ray actors each holding one loaded model.

    Args:
        spec: the model every actor loads in its constructor (once).
        config: resolved resources (:func:`resolve_pool`).
    """

    def __init__(self, spec: ModelSpec, config: PoolConfig) -> None:
        import ray

        self.config = config
        use_gpu = bool(config.gpus_per_actor)
        remote_cls = ray.remote(SegmentWorker).options(
            num_cpus=config.cpus_per_actor, num_gpus=config.gpus_per_actor or 0,
            max_restarts=1, max_task_retries=0)
        threads = max(1, int(config.cpus_per_actor or 1))
        self.actors = [remote_cls.remote(spec, threads=threads, use_gpu=use_gpu,
                                         chunk=config.chunk)
                       for _ in range(int(config.num_actors or 1))]

    def signature(self) -> dict[str, Any]:
        """The first actor's model signature (waits for its model to load; load errors raise)."""
        import ray

        try:
            return ray.get(self.actors[0].signature.remote())
        except Exception as exc:  # noqa: BLE001 - RayActorError & co. wrap the real cause
            lines = [ln for ln in str(exc).splitlines() if ln.strip()]
            cause = next((ln for ln in reversed(lines) if "Error" in ln), lines[-1] if lines
                         else type(exc).__name__)
            raise ModelLoadError(f"the actors could not load the model: {cause.strip()}") from exc

    def info(self) -> list[dict[str, Any]]:
        """Each live actor's host, device and peak memory."""
        import ray

        out = []
        for actor in self.actors:
            try:
                out.append(ray.get(actor.info.remote(), timeout=60))
            except Exception as exc:  # noqa: BLE001 - a dead actor has no info
                log.warning("actor info unavailable: %s", exc)
        return out

    def run(self, tasks: Iterable[SliceTask]) -> Iterator[SliceBatchResult]:
        """Stream ``tasks`` through the actors; yield one result per task, as they finish.

        The iterator is pulled lazily: at most ``num_actors * queue_depth`` tasks are in flight.
        """
        import ray

        source = iter(tasks)
        load = {i: 0 for i in range(len(self.actors))}
        pending: dict[Any, tuple[int, SliceTask]] = {}
        exhausted = False
        depth = max(1, self.config.queue_depth)
        while True:
            while not exhausted:
                free = [i for i, n in load.items() if n < depth]
                if not free:
                    break
                task = next(source, None)
                if task is None:
                    exhausted = True
                    break
                i = min(free, key=lambda j: load[j])
                pending[self.actors[i].__call__.remote(task)] = (i, task)
                load[i] += 1
            if not pending:
                return
            ready, _ = ray.wait(list(pending), num_returns=1)
            i, task = pending.pop(ready[0])
            load[i] -= 1
            try:
                yield ray.get(ready[0])
            except Exception as exc:  # noqa: BLE001 - actor died (OOM kill, node lost)
                log.warning("worker failed on case %s: %s", task.case_id, exc)
                yield SliceBatchResult(task.case_id, task.start, None, None, None, 0.0,
                                  f"worker died on slices {task.start}-"
                                  f"{task.start + len(task.slices) - 1}: "
                                  f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
