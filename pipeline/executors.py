"""Executors: run a stage's units here (local) or on a Ray cluster.

Both run the same code per unit (`run_unit`): process it, then record it in the ledger.
On Ray, stages that hold a model run on actors that call `setup` once; the others run as
one task per unit. Stages never see which executor runs them.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.rundir import Ledger
from stages.base import Stage, StageError, StageSettings, Unit

log = logging.getLogger("megasynth")


@dataclass(frozen=True)
class StageSpec:
    """Everything a worker needs to rebuild a stage: plain, picklable data."""

    cls: type[Stage]
    settings: StageSettings
    inputs: dict[str, Path]
    output: Path
    fingerprint: str
    run_dir: Path

    @property
    def name(self) -> str:
        return self.cls.name

    def build(self) -> Stage:
        return self.cls(self.settings, self.inputs, self.output)


class UnitFailed(RuntimeError):
    pass


def unit_failed(spec: StageSpec, unit: Unit, cause: BaseException, detail: str) -> UnitFailed:
    """The error that stops the run; a cause that is not a StageError is a bug, logged with its traceback."""
    if not isinstance(cause, (StageError, ValueError, OSError)):
        log.error("%s unit %s failed:\n%s", spec.name, unit.id, detail)
    return UnitFailed(f"{spec.name} unit {unit.id} failed: {type(cause).__name__}: {cause}")


def run_unit(stage: Stage, spec: StageSpec, unit: Unit) -> dict:
    t0 = time.perf_counter()
    stats = stage.process(unit)
    return Ledger(spec.run_dir).record(spec.name, unit.id, spec.fingerprint, stats, time.perf_counter() - t0)


class LocalExecutor:
    """Runs units one after another in this process; for debugging and small runs."""

    name = "local"

    def __init__(self) -> None:
        self._stages: dict[tuple, Stage] = {}

    def run(self, spec: StageSpec, units: list[Unit], done: Callable[[dict], None]) -> None:
        key = (spec.cls, spec.fingerprint)
        if key not in self._stages:  # one setup per stage per run, like one actor
            stage = spec.build()
            stage.setup()
            self._stages = {key: stage}
        stage = self._stages[key]
        for unit in units:
            try:
                done(run_unit(stage, spec, unit))
            except Exception as e:
                raise unit_failed(spec, unit, e, traceback.format_exc()) from e

    def close(self) -> None:
        self._stages.clear()


class RayExecutor:
    """Maps units onto Ray: tasks for CPU stages, actors (model loaded once) for model stages."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None, actors: int | None = None):
        import ray

        self.ray = ray
        self.actors = actors
        if not ray.is_initialized():
            kwargs: dict = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
            if address:
                kwargs["address"] = address
            else:
                kwargs.update(num_cpus=num_cpus or os.cpu_count(), num_gpus=num_gpus)
            ray.init(**kwargs)
            self._owns = True
        else:
            self._owns = False

    def run(self, spec: StageSpec, units: list[Unit], done: Callable[[dict], None]) -> None:
        if not units:
            return
        res = spec.build().resources()
        opts = {"num_cpus": res.cpus, "num_gpus": res.gpus}
        if spec.cls.loads_model:
            self._run_actors(spec, units, opts, done)
        else:
            self._run_tasks(spec, units, opts, done)

    def _run_tasks(self, spec, units, opts, done) -> None:
        ray = self.ray
        task = ray.remote(_task).options(max_retries=2, **opts)
        pending = {task.remote(spec, u): u for u in units}
        self._drain(spec, pending, done)

    def _run_actors(self, spec, units, opts, done) -> None:
        ray = self.ray
        n = min(len(units), self.actors or self._fit(opts))
        worker = ray.remote(_Worker).options(max_restarts=2, max_task_retries=2, **opts)
        actors = [worker.remote(spec) for _ in range(n)]
        try:
            queue = list(units)
            pending = {}
            free = list(actors)

            def submit() -> None:
                while free and queue:
                    a, u = free.pop(), queue.pop(0)
                    pending[a.run.remote(u)] = (u, a)

            submit()
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                u, a = pending.pop(ready[0])
                done(self._get(spec, ready[0], u))
                free.append(a)
                submit()
        finally:
            for a in actors:
                ray.kill(a)

    def _drain(self, spec, pending: dict, done) -> None:
        while pending:
            ready, _ = self.ray.wait(list(pending), num_returns=1)
            unit = pending.pop(ready[0])
            done(self._get(spec, ready[0], unit))

    def _get(self, spec, ref, unit):
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayError as e:
            cause = getattr(e, "cause", None) or e
            raise unit_failed(spec, unit, cause, str(e)) from e  # a RayTaskError's text holds the remote traceback

    def _fit(self, opts: dict) -> int:
        total = self.ray.cluster_resources()
        fits = []
        if opts["num_gpus"]:
            fits.append(int(total.get("GPU", 0) // opts["num_gpus"]))
        if opts["num_cpus"]:
            fits.append(int(total.get("CPU", 0) // opts["num_cpus"]))
        return max(1, min(fits) if fits else 1)

    def close(self) -> None:
        if self._owns and self.ray.is_initialized():
            self.ray.shutdown()


def _task(spec: StageSpec, unit: Unit) -> dict:
    stage = spec.build()
    stage.setup()
    return run_unit(stage, spec, unit)


class _Worker:
    def __init__(self, spec: StageSpec):
        self.spec = spec
        self.stage = spec.build()
        self.stage.setup()

    def run(self, unit: Unit) -> dict:
        return run_unit(self.stage, self.spec, unit)


def make_executor(kind: str, **kwargs) -> LocalExecutor | RayExecutor:
    if kind == "local":
        return LocalExecutor()
    if kind == "ray":
        return RayExecutor(**kwargs)
    raise ValueError(f"unknown executor {kind!r}: use ray or local")
