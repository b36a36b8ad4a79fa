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

__all__ = ["PoolConfig", "ActorPool", "ModelLoadError", "PoolFitError", "ray_session",
           "resolve_pool", "check_fit", "node_resources", "STARTUP_TIMEOUT_S", "TASK_TIMEOUT_S"]

log = logging.getLogger(__name__)

#: Seconds the actors get to load the model (``SEGMOTE_STARTUP_TIMEOUT``): past it the run
#: stops with exit 2 instead of waiting for resources that never come.
STARTUP_TIMEOUT_S = float(os.environ.get("SEGMOTE_STARTUP_TIMEOUT", "900"))
#: Seconds one batch may take (``SEGMOTE_TASK_TIMEOUT``): past it the batch fails and its
#: actor (hung kernel, lost node) is replaced.
TASK_TIMEOUT_S = float(os.environ.get("SEGMOTE_TASK_TIMEOUT", "1800"))
#: Test hook: a case id whose first batch makes the actor behave as after a CUDA
#: illegal-memory-access (every later call on it fails), to show the actor gets replaced.
POISON_ENV = "SEGMOTE_TEST_POISON_CASE"


class ModelLoadError(ValueError):
    """The actors failed to load the model (bad checkpoint, missing SAM weights...)."""


class PoolFitError(ValueError):
    """The actor pool asks for more than the cluster (or any one node) has: nothing was sent."""


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


def node_resources() -> list[dict[str, float]]:
    """CPU and GPU totals of each live node of the joined Ray cluster."""
    import ray

    return [{"CPU": float(node["Resources"].get("CPU", 0.0)),
             "GPU": float(node["Resources"].get("GPU", 0.0))}
            for node in ray.nodes() if node.get("Alive")]


def _fits(have: float, each: float) -> float:
    return float("inf") if each <= 0 else int(have / each + 1e-9)


def check_fit(config: PoolConfig, resources: dict[str, float],
              nodes: list[dict[str, float]] | None = None) -> None:
    """Refuse a pool Ray could never place (it would wait forever, silently).

    All actors together must fit the cluster's totals (actors x GPUs, actors x CPUs), one actor
    must fit on one node, and the nodes must hold all actors between them.

    Raises:
        PoolFitError: naming what does not fit and what the cluster has.
    """
    n = int(config.num_actors or 1)
    gpa, cpa = float(config.gpus_per_actor or 0.0), float(config.cpus_per_actor or 0.0)
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
    problems = []
    if n * gpa > gpus + 1e-9:
        problems.append(f"{n} actors x {gpa:g} GPU = {n * gpa:g} GPUs, the cluster has {gpus:g}")
    if n * cpa > cpus + 1e-9:
        problems.append(f"{n} actors x {cpa:g} CPU = {n * cpa:g} CPUs, the cluster has {cpus:g}")
    if nodes and not problems:
        per_node = [min(_fits(nd.get("CPU", 0.0), cpa), _fits(nd.get("GPU", 0.0), gpa))
                    for nd in nodes]
        sizes = ", ".join(f"{nd.get('CPU', 0):g} CPU/{nd.get('GPU', 0):g} GPU" for nd in nodes)
        if max(per_node) < 1:
            problems.append(f"one actor ({cpa:g} CPU, {gpa:g} GPU) fits on no node "
                            f"(nodes: {sizes})")
        elif sum(per_node) < n:
            problems.append(f"{n} actors of {cpa:g} CPU, {gpa:g} GPU: the nodes ({sizes}) "
                            f"hold only {int(sum(per_node))}")
    if problems:
        raise PoolFitError("the actor pool does not fit the cluster: " + "; ".join(problems)
                           + " (lower --num-actors, --cpus-per-actor or --gpus-per-actor)")


class ActorPool:
    """``num_actors`` Ray actors each holding one loaded model.

    Args:
        spec: the model every actor loads in its constructor (once).
        config: resolved resources (:func:`resolve_pool`); checked against the cluster
            (:func:`check_fit`) before any actor is created.
        task_timeout: seconds one batch may take before its actor is replaced.
    """

    def __init__(self, spec: ModelSpec, config: PoolConfig,
                 task_timeout: float | None = None) -> None:
        import ray

        check_fit(config, {k: float(v) for k, v in ray.cluster_resources().items()},
                  node_resources())
        self.config = config
        self.spec = spec
        self.task_timeout = TASK_TIMEOUT_S if task_timeout is None else float(task_timeout)
        self.replaced = 0
        self._remote = ray.remote(SegmentWorker).options(
            num_cpus=config.cpus_per_actor, num_gpus=config.gpus_per_actor or 0,
            max_restarts=1, max_task_retries=0)
        self.actors = [self._new_actor() for _ in range(int(config.num_actors or 1))]

    def _new_actor(self) -> Any:
        threads = max(1, int(self.config.cpus_per_actor or 1))
        return self._remote.remote(self.spec, threads=threads,
                                   use_gpu=bool(self.config.gpus_per_actor),
                                   chunk=self.config.chunk,
                                   poison_case=os.environ.get(POISON_ENV) or None)

    def signature(self, timeout: float | None = None) -> dict[str, Any]:
        """The model signature all actors share (waits for every model to load).

        Raises:
            ModelLoadError: an actor could not load the model, the actors did not start within
                ``timeout`` seconds, or two actors differ (weights, precision, device): one
                output store must never mix them under one signature.
        """
        import ray
        from ray.exceptions import GetTimeoutError

        timeout = STARTUP_TIMEOUT_S if timeout is None else timeout
        try:
            sigs = ray.get([a.signature.remote() for a in self.actors], timeout=timeout)
        except GetTimeoutError as exc:
            raise ModelLoadError(
                f"the actors did not load the model within {timeout:g} s (Ray could not place "
                f"them, or loading hangs); see `ray status` (SEGMOTE_STARTUP_TIMEOUT sets "
                f"the wait)") from exc
        except Exception as exc:  # noqa: BLE001 - RayActorError & co. wrap the real cause
            lines = [ln for ln in str(exc).splitlines() if ln.strip()]
            cause = next((ln for ln in reversed(lines) if "Error" in ln), lines[-1] if lines
                         else type(exc).__name__)
            raise ModelLoadError(f"the actors could not load the model: {cause.strip()}") from exc
        for i, sig in enumerate(sigs[1:], 1):
            if sig != sigs[0]:
                diff = sorted(k for k in set(sig) | set(sigs[0]) if sig.get(k) != sigs[0].get(k))
                detail = ", ".join(f"{k}: {sigs[0].get(k)!r} vs {sig.get(k)!r}" for k in diff
                                   if k in ("device", "bf16_encoder", "torch"))
                raise ModelLoadError(
                    f"actor {i} runs another model configuration than actor 0 (differs in "
                    f"{', '.join(diff)}{'; ' + detail if detail else ''}): one run must not "
                    f"mix them; make the nodes alike or pass --precision explicitly")
        return sigs[0]

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

    def _replace(self, i: int, why: str) -> None:
        """Kill actor ``i`` for good (no Ray restart) and start a fresh one in its place."""
        import ray

        log.warning("replacing actor %d: %s", i, why)
        try:
            ray.kill(self.actors[i], no_restart=True)
        except Exception as exc:  # noqa: BLE001 - already dead
            log.debug("kill of actor %d: %s", i, exc)
        self.actors[i] = self._new_actor()
        self.replaced += 1

    def _resubmit(self, i: int, pending: dict[Any, tuple[int, SliceTask, float]]) -> None:
        """Send the batches still queued on the replaced actor ``i`` to its successor (none
        of their results was taken, so nothing is done twice)."""
        for ref in [r for r, (j, _, _) in pending.items() if j == i]:
            _, task, _ = pending.pop(ref)
            pending[self.actors[i].__call__.remote(task)] = (i, task, time.monotonic())

    def run(self, tasks: Iterable[SliceTask]) -> Iterator[SliceBatchResult]:
        """Stream ``tasks`` through the actors; yield one result per task, as they finish.

        The iterator is pulled lazily: at most ``num_actors * queue_depth`` tasks are in flight.
        A batch that raises a poisoning error (a CUDA context that no later call can use) or
        runs past ``task_timeout`` fails, and its actor is replaced; the others go on.
        """
        import ray

        from .worker import WorkerPoisonedError

        source = iter(tasks)
        load = {i: 0 for i in range(len(self.actors))}
        pending: dict[Any, tuple[int, SliceTask, float]] = {}
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
                pending[self.actors[i].__call__.remote(task)] = (i, task, time.monotonic())
                load[i] += 1
            if not pending:
                return
            oldest = min(t0 for _, _, t0 in pending.values())
            wait = max(0.1, min(30.0, self.task_timeout - (time.monotonic() - oldest)))
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=wait)
            if not ready:
                now = time.monotonic()
                late = {ref for ref, (_, _, t0) in pending.items()
                        if now - t0 > self.task_timeout}
                for i in sorted({pending[ref][0] for ref in late}):
                    for ref in [r for r in late if pending[r][0] == i]:
                        _, task, _ = pending.pop(ref)
                        load[i] -= 1
                        yield _failed(task, f"no result within {self.task_timeout:g} s "
                                            f"(SEGMOTE_TASK_TIMEOUT); its actor was replaced")
                    self._replace(i, f"a batch ran past {self.task_timeout:g} s")
                    self._resubmit(i, pending)
                continue
            i, task, _ = pending.pop(ready[0])
            load[i] -= 1
            try:
                yield ray.get(ready[0])
            except Exception as exc:  # noqa: BLE001 - actor died (OOM kill, node lost)
                cause = getattr(exc, "cause", None)
                poisoned = isinstance(exc, WorkerPoisonedError) or isinstance(
                    cause, WorkerPoisonedError)
                first = str(cause if poisoned else exc).splitlines()[0][:300]
                log.warning("worker failed on case %s: %s", task.case_id, first)
                if poisoned:
                    self._replace(i, first)
                    self._resubmit(i, pending)
                    yield _failed(task, f"{first}; its actor was replaced")
                else:
                    yield _failed(task, f"worker died: {type(exc).__name__}: {first}")

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def _failed(task: SliceTask, why: str) -> SliceBatchResult:
    return SliceBatchResult(task.case_id, task.start, None, None, None, 0.0,
                            f"slices {task.start}-{task.start + len(task.slices) - 1}: {why}")
