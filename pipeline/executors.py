"""Executors: run a stage's units here (local) or on a Ray cluster.

Both run the same code per unit (`run_unit`): process it, then record it in the ledger, with
the unit's log lines in the run folder. What happens when something goes wrong is decided
here, the same way for both:

- a transient I/O error (`stages.base.is_transient`) fails the unit, which is retried after a
  pause, up to `unit_retries` times;
- on Ray, a lost worker (a killed process, an actor gone, a node removed) is replaced and its
  unit submitted again, up to `lost_retries` times per unit;
- a stage whose workers no node can host (a GPU asked of a cluster without one, the only GPU
  node gone) ends the run with one line after `placement_timeout_s`, never a silent hang;
- anything else stops the run with one line (and the traceback logged, if it is a bug).

On Ray, stages that hold a model run on actors that call `setup` once; the others run as one
task per unit. The driver keeps a bounded window of units in flight, never every unit at once.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
import traceback
import warnings
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from pipeline.rundir import Ledger
from stages.base import Stage, StageError, StageSettings, Unit, is_transient

log = logging.getLogger("megasynth")

Done = Callable[[Unit, dict], None]  # called with each finished unit and its ledger record
Advance = Callable[[Unit, int], None]  # called as a unit reports items done before it ends


@dataclass(frozen=True)
class StageSpec:
    """Everything a worker needs to rebuild a stage: plain, picklable data."""

    cls: type[Stage]
    settings: StageSettings
    inputs: dict[str, Path]
    output: Path
    fingerprint: str
    run_dir: Path
    reuse_runs: tuple[Path, ...] = ()

    @property
    def name(self) -> str:
        return self.cls.name

    def build(self) -> Stage:
        stage = self.cls(self.settings, self.inputs, self.output)
        stage.reuse_runs = self.reuse_runs
        return stage


@dataclass(frozen=True)
class Policy:
    """How an executor handles trouble; `executor.*` settings."""

    unit_retries: int = 3
    retry_pause_s: float = 2.0
    lost_retries: int = 5
    placement_timeout_s: float = 300.0
    max_in_flight: int | None = None  # tasks submitted at once; default twice what the cluster runs at once


class UnitFailed(RuntimeError):
    pass


def describe_error(cause: BaseException) -> str:
    """One line for the user; disk-full gets its own words, wherever it happened."""
    if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" writing {cause.filename}" if cause.filename else ""
        return f"no space left on device{where} ({os.strerror(cause.errno)}): free some space and run again; finished units are kept"
    return f"{type(cause).__name__}: {cause}"


def unit_failed(spec: StageSpec, unit: Unit, cause: BaseException, detail: str) -> UnitFailed:
    """The error that stops the run; a cause that is not a StageError is a bug, logged with its traceback."""
    if not isinstance(cause, (StageError, ValueError, OSError)):
        log.error("%s unit %s failed:\n%s", spec.name, unit.id, detail)
    message = f"{spec.name} unit {unit.id} failed: {describe_error(cause)}"
    Ledger(spec.run_dir).fail_stage(spec.name, message)
    return UnitFailed(message)


@contextmanager
def unit_log(spec: StageSpec, unit: Unit) -> Iterator[None]:
    """The unit's log lines, warnings included, in `_state/{stage}/logs/{unit}.log` (written as they come)."""
    path = Ledger(spec.run_dir).log_file(spec.name, unit.id)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", delay=True)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {socket.gethostname()} pid %(process)d %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    loggers = [logging.getLogger("megasynth"), logging.getLogger("py.warnings")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        if lg.getEffectiveLevel() > logging.INFO:
            lg.setLevel(logging.INFO)
    logging.captureWarnings(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            yield
    finally:
        logging.captureWarnings(False)
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)
        handler.close()


def run_unit(stage: Stage, spec: StageSpec, unit: Unit, advance: Callable[[int], None] | None = None) -> dict:
    with unit_log(spec, unit):
        stage.advance = advance or _ignore
        t0 = time.perf_counter()
        stats = stage.process(unit)
        return Ledger(spec.run_dir).record(spec.name, unit.id, spec.fingerprint, stats, time.perf_counter() - t0)


def _ignore(n: int) -> None:
    pass


class LocalExecutor:
    """Runs units one after another in this process; for debugging and small runs."""

    name = "local"

    def __init__(self, policy: Policy = Policy()) -> None:
        self.policy = policy
        self._stages: dict[tuple, Stage] = {}

    def run(self, spec: StageSpec, units: list[Unit], done: Done, advance: Advance | None = None) -> None:
        key = (spec.cls, spec.fingerprint)
        if key not in self._stages:  # one setup per stage per run, like one actor
            stage = spec.build()
            stage.worker_count = 1
            stage.setup()
            self._stages = {key: stage}
        stage = self._stages[key]
        for unit in units:
            for attempt in range(self.policy.unit_retries + 1):
                try:
                    rec = run_unit(stage, spec, unit, (lambda n, u=unit: advance(u, n)) if advance else None)
                    break
                except Exception as e:
                    if is_transient(e) and attempt < self.policy.unit_retries:
                        log.warning("%s unit %s: %s; retrying (%d of %d)", spec.name, unit.id, describe_error(e), attempt + 1, self.policy.unit_retries)
                        time.sleep(self.policy.retry_pause_s * 2**attempt)
                        continue
                    raise unit_failed(spec, unit, e, traceback.format_exc()) from e
            done(unit, rec)  # outside the unit's error handling: what the driver decides is not the unit's failure

    def close(self) -> None:
        self._stages.clear()


def start_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> bool:
    """Connect to `address`, or start an embedded cluster; False if this process is already connected."""
    if not address:  # an embedded cluster is this machine's alone: Ray binds it to 127.0.0.1 when this is 0 at its import
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    if address:
        kwargs["address"] = address
    else:  # "local": a cluster of our own, even where `ray start` left one running (use --ray-address auto for that)
        kwargs.update(address="local", num_cpus=num_cpus or os.cpu_count(), num_gpus=num_gpus)
    ray.init(**kwargs)
    return True


class RayExecutor:
    """Maps units onto Ray: tasks for CPU stages, actors (model loaded once) for model stages."""

    name = "ray"
    POLL_S = 1.0

    def __init__(self, address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
                 actors: int | None = None, policy: Policy = Policy()):  # fmt: skip
        import ray

        self.ray = ray
        self.actors = actors
        self.policy = policy
        self._env: dict = {}
        self._engine = 0
        self._owns = start_ray(address, num_cpus, num_gpus)

    def run(self, spec: StageSpec, units: list[Unit], done: Done, advance: Advance | None = None) -> None:
        if not units:
            return
        stage = spec.build()
        res = stage.resources()
        opts = {"num_cpus": res.cpus, "num_gpus": res.gpus}
        self._env = sent_environment(stage)
        self._engine = res.engine_gpus
        progress = _Progress(self.ray, advance)
        try:
            if spec.cls.holds_model(spec.settings):
                self._run_actors(spec, units, opts, done, progress)
            else:
                self._run_tasks(spec, units, opts, done, progress)
        finally:
            progress.close()

    # --- tasks -------------------------------------------------------------------------------

    def _run_tasks(self, spec: StageSpec, units: list[Unit], opts: dict, done: Done, progress: "_Progress") -> None:
        ray = self.ray
        task = ray.remote(_task).options(max_retries=0, retry_exceptions=False, **opts, **self._env)  # retries are decided here (_Tries)
        spec_ref = ray.put(spec)
        window = self.policy.max_in_flight or max(2, 2 * self._fit(opts))
        queue = deque(units)
        pending: dict = {}
        tries = _Tries(self.policy)
        watch = _Placement(self, spec, opts)
        while queue or pending:
            while queue and len(pending) < window:
                u = queue.popleft()
                pending[task.remote(spec_ref, u, progress.sink)] = u
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=self.POLL_S)
            progress.drain()
            if not ready:
                watch.check(busy=False)
                continue
            watch.progressed()
            u = pending.pop(ready[0])
            try:
                rec = ray.get(ready[0])
            except ray.exceptions.RayError as e:
                if tries.again(spec, u, e):
                    queue.appendleft(u)
                    continue
                raise self._failed(spec, u, e) from e
            done(u, rec)

    # --- actors ------------------------------------------------------------------------------

    def _run_actors(self, spec: StageSpec, units: list[Unit], opts: dict, done: Done, progress: "_Progress") -> None:
        ray = self.ray
        n = min(len(units), self.actors or self._fit(opts))
        worker = ray.remote(_Worker).options(max_restarts=0, max_task_retries=0, **opts, **self._env)
        spec_ref = ray.put(spec)
        starting: dict = {}  # ready ref -> actor, for actors not yet known to be up
        actors: list = []

        groups: dict = {}  # actor -> the placement group reserving its engine's GPUs

        def start() -> None:
            if self._engine:  # the engine's own Ray workers land in the group's bundles, one GPU each
                from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

                pg = ray.util.placement_group(engine_bundles(opts["num_cpus"], self._engine), strategy="PACK")
                a = worker.options(num_gpus=0, scheduling_strategy=PlacementGroupSchedulingStrategy(
                    pg, placement_group_capture_child_tasks=True)).remote(spec_ref, n)  # fmt: skip
                groups[a] = pg
            else:
                a = worker.remote(spec_ref, n)
            actors.append(a)
            starting[a.__ray_ready__.remote()] = a

        def retire(a) -> None:
            ray.kill(a)
            if a in groups:
                ray.util.remove_placement_group(groups.pop(a))

        for _ in range(n):
            start()
        queue = deque(units)
        running: dict = {}  # result ref -> (unit, actor)
        free: list = []
        tries = _Tries(self.policy)
        watch = _Placement(self, spec, opts)
        try:
            while queue or running:
                while free and queue:
                    a, u = free.pop(), queue.popleft()
                    running[a.run.remote(u, progress.sink)] = (u, a)
                ready, _ = ray.wait([*running, *starting], num_returns=1, timeout=self.POLL_S)
                progress.drain()
                if not ready:
                    watch.check(busy=bool(running))
                    continue
                ref = ready[0]
                if ref in starting:
                    a = starting.pop(ref)
                    try:
                        ray.get(ref)
                    except ray.exceptions.RayError as e:
                        actors.remove(a)
                        if _creation_error(e):  # the worker could not set up (a model, an environment variable): final
                            raise UnitFailed(self._fail_line(spec, f"a worker could not start: {_creation_error(e)}")) from e
                        start()  # lost before it was up (its node went away): start another
                        continue
                    watch.progressed()
                    free.append(a)
                    continue
                u, a = running.pop(ref)
                try:
                    rec = ray.get(ref)
                except ray.exceptions.RayError as e:
                    if isinstance(e, ray.exceptions.RayActorError):  # the worker is gone: replace it
                        actors.remove(a)
                        retire(a)
                        start()
                    else:
                        free.append(a)
                    if tries.again(spec, u, e):
                        queue.appendleft(u)
                        continue
                    raise self._failed(spec, u, e) from e
                watch.progressed()
                free.append(a)
                done(u, rec)
        finally:
            for a in actors:
                retire(a)

    # --- shared ------------------------------------------------------------------------------

    def _failed(self, spec: StageSpec, unit: Unit, e: BaseException) -> UnitFailed:
        cause = getattr(e, "cause", None) or e
        return unit_failed(spec, unit, cause, str(e))  # a RayTaskError's text holds the remote traceback

    def _fail_line(self, spec: StageSpec, message: str) -> str:
        line = f"{spec.name}: {message}"
        Ledger(spec.run_dir).fail_stage(spec.name, line)
        return line

    def _fit(self, opts: dict) -> int:
        total = self.ray.cluster_resources()
        if self._engine:
            return max(1, int(total.get("GPU", 0) // self._engine))
        fits = []
        if opts["num_gpus"]:
            fits.append(int(total.get("GPU", 0) // opts["num_gpus"]))
        if opts["num_cpus"]:
            fits.append(int(total.get("CPU", 0) // opts["num_cpus"]))
        return max(1, min(fits) if fits else 1)

    def hosts(self, opts: dict) -> tuple[bool, str]:
        """Whether the alive nodes can host one worker, and what they offer."""
        nodes = [n for n in self.ray.nodes() if n.get("Alive")]
        fits = can_host([n["Resources"] for n in nodes], opts["num_cpus"], opts["num_gpus"], self._engine)
        offer = "; ".join(f"{n.get('NodeManagerAddress')} CPU {n['Resources'].get('CPU', 0):g} GPU {n['Resources'].get('GPU', 0):g}" for n in nodes)
        return fits, offer or "no alive node"

    def close(self) -> None:
        if self._owns and self.ray.is_initialized():
            self.ray.shutdown()


def engine_bundles(cpus: float, gpus: int) -> list[dict]:
    """A worker whose engine spreads over `gpus` GPUs (vLLM tensor parallel): one GPU per bundle, where the
    engine puts one of its Ray workers; the first bundle also holds the worker's own CPUs."""
    return [{"GPU": 1, "CPU": max(cpus, 1)}] + [{"GPU": 1, "CPU": 1} for _ in range(gpus - 1)]


def can_host(nodes: list[dict], cpus: float, gpus: float, engine_gpus: int = 0) -> bool:
    """Whether nodes with these resources can host one worker: on one node, or an engine's bundles packed
    over several."""
    if engine_gpus:
        bundles = engine_bundles(cpus, engine_gpus)
        return sum(n.get("GPU", 0) for n in nodes) >= engine_gpus and sum(n.get("CPU", 0) for n in nodes) >= sum(b["CPU"] for b in bundles)
    need = {"CPU": cpus, "GPU": gpus}
    return any(all(n.get(k, 0) >= v for k, v in need.items() if v) for n in nodes)


def sent_environment(stage: Stage) -> dict:
    """Ray options that carry the variables the stage's workers need from the driver's environment."""
    values = {name: os.environ[name] for name in stage.environment() if name in os.environ}
    return {"runtime_env": {"env_vars": values}} if values else {}


class _Tries:
    """Per-unit retry budgets: transient errors of our own code, and workers lost under it."""

    def __init__(self, policy: Policy):
        self.policy = policy
        self.transient: dict[str, int] = {}
        self.lost: dict[str, int] = {}

    def again(self, spec: StageSpec, unit: Unit, e: BaseException) -> bool:
        import ray

        cause = getattr(e, "cause", None) or e
        lost = isinstance(e, (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                              ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError))  # fmt: skip
        if lost:
            n = self.lost[unit.id] = self.lost.get(unit.id, 0) + 1
            if n <= self.policy.lost_retries:
                log.warning("%s unit %s: its worker was lost (%s); running it again (%d of %d)", spec.name, unit.id, type(e).__name__, n, self.policy.lost_retries)
                return True
            return False
        if is_transient(cause):
            n = self.transient[unit.id] = self.transient.get(unit.id, 0) + 1
            if n <= self.policy.unit_retries:
                log.warning("%s unit %s: %s; retrying (%d of %d)", spec.name, unit.id, describe_error(cause), n, self.policy.unit_retries)
                time.sleep(self.policy.retry_pause_s * 2 ** (n - 1))
                return True
        return False


class _Placement:
    """Ends the run when no alive node can host a worker of the stage for `placement_timeout_s`."""

    def __init__(self, ex: RayExecutor, spec: StageSpec, opts: dict):
        self.ex, self.spec, self.opts = ex, spec, opts
        self.since: float | None = None
        self.check(busy=False)

    def progressed(self) -> None:
        self.since = None

    def check(self, busy: bool) -> None:
        fits, offer = self.ex.hosts(self.opts)
        if fits or busy:
            self.since = None
            return
        now = time.monotonic()
        self.since = self.since or now
        if now - self.since >= self.ex.policy.placement_timeout_s:
            need = ", ".join(f"{k} {v:g}" for k, v in (("CPU", self.opts["num_cpus"]), ("GPU", self.opts["num_gpus"])) if v)
            raise UnitFailed(self.ex._fail_line(
                self.spec, f"no node can run a worker (each needs {need}) for {self.ex.policy.placement_timeout_s:g} s; "
                f"alive nodes: {offer}. Add such a node, or change {self.spec.name}'s device/gpus/cpus settings"))  # fmt: skip


class _Progress:
    """Items reported by running units, carried to the driver's progress bar through a small Ray queue."""

    def __init__(self, ray, advance: Advance | None):
        self.advance = advance
        self.sink = None
        self.last = 0.0
        self.ray = ray
        if advance is not None:
            from ray.util.queue import Queue
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            # On the driver's own node: a worker node that goes away must not take the queue with it.
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            self.sink = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})

    def drain(self, force: bool = False) -> None:
        """Pass on what units reported; at most twice a second, since each look is a call to the queue's actor."""
        if self.sink is None or (not force and time.monotonic() - self.last < 0.5):
            return
        self.last = time.monotonic()
        try:
            for unit, n in self.sink.get_nowait_batch(self.sink.qsize()) if self.sink.qsize() else []:
                self.advance(unit, n)
        except self.ray.exceptions.RayError as e:  # the bar is a courtesy: losing it never stops a run
            log.warning("progress reports from workers stopped (%s); units still count when they finish", type(e).__name__)
            self.sink = None

    def close(self) -> None:
        if self.sink is not None:
            self.drain(force=True)
        if self.sink is not None:
            self.sink.shutdown()


def _reporter(sink, unit: Unit) -> Callable[[int], None] | None:
    """A unit's `advance`, throttled to one message a second."""
    if sink is None:
        return None
    state = {"n": 0, "t": time.monotonic()}

    def advance(n: int) -> None:
        state["n"] += n
        if not state.get("dead") and time.monotonic() - state["t"] >= 1.0:
            try:
                sink.put_nowait((unit, state["n"]))
            except Exception:  # the queue went with the driver: the unit goes on, unreported
                state["dead"] = True
            state["n"], state["t"] = 0, time.monotonic()

    return advance


def _creation_error(e: BaseException) -> str | None:
    """The error a worker raised while setting up, if that is why it died."""
    text = str(e)
    marker = "error raised in its creation task"
    if marker not in text:
        return None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return next((ln for ln in reversed(lines) if ":" in ln and not ln.startswith("File ")), lines[-1] if lines else text)


def _task(spec: StageSpec, unit: Unit, sink=None) -> dict:
    stage = spec.build()
    stage.setup()
    return run_unit(stage, spec, unit, _reporter(sink, unit))


class _Worker:
    def __init__(self, spec: StageSpec, workers: int):
        self.spec = spec
        self.stage = spec.build()
        self.stage.worker_count = workers
        self.stage.setup()

    def run(self, unit: Unit, sink=None) -> dict:
        return run_unit(self.stage, self.spec, unit, _reporter(sink, unit))


def make_executor(kind: str, policy: Policy = Policy(), **kwargs) -> LocalExecutor | RayExecutor:
    if kind == "local":
        return LocalExecutor(policy)
    if kind == "ray":
        return RayExecutor(policy=policy, **kwargs)
    raise ValueError(f"unknown executor {kind!r}: use ray or local")
