"""The stage contract.

A stage turns the files of its inputs into the files of its output, one unit of work at a
time. It declares the resources one worker needs and loads any model once in `setup`. It
knows nothing of Ray, of the CLI, or of the other stages: the pipeline hands it its
settings and the folders it reads and writes, and decides where and how units run.
"""

from __future__ import annotations

import errno
import os
import time
from abc import ABC, abstractmethod
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator

from pydantic import BaseModel, ConfigDict


class StageError(RuntimeError):
    """A unit failure a user can act on (a server that gave up, an unreadable input): one line, no traceback."""


class TransientError(OSError):
    """An I/O failure that may pass (EIO, ESTALE, a shard briefly missing on one node).

    The executor retries the unit; it is never recorded as a rejection inside a unit marked done.
    """


# errno values a shared filesystem or a flaky disk gives for trouble that can pass.
TRANSIENT_ERRNOS = frozenset(
    getattr(errno, n) for n in ("EIO", "ESTALE", "ENOENT", "EAGAIN", "ETIMEDOUT", "EBUSY", "ENETDOWN", "ENETUNREACH",
                                "ECONNRESET", "ECONNABORTED", "EHOSTDOWN", "EHOSTUNREACH", "EREMOTEIO") if hasattr(errno, n)
)  # fmt: skip


def is_transient(e: BaseException) -> bool:
    """Whether an error should fail and retry its unit rather than reject an item."""
    return isinstance(e, TransientError) or (isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS)


class StageSettings(BaseModel):
    """Base of every stage's typed settings: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage needs."""

    cpus: float = 1.0
    gpus: float = 0.0
    #: GPUs an engine inside the worker spreads over (vLLM tensor parallel): reserved together as a placement
    #: group whose bundles the engine's own Ray workers use; the worker itself then asks for none.
    engine_gpus: int = 0

    @classmethod
    def of(cls, cpus: float, gpus: float | None, on_gpu: bool) -> "Resources":
        """The settings' `gpus` when given, else one GPU per worker exactly when the work runs on one."""
        return cls(cpus=cpus, gpus=gpus if gpus is not None else (1.0 if on_gpu else 0.0))


@dataclass(frozen=True)
class Unit:
    """One unit of work: a shard, or a global step. `id` is stable across runs and safe as a file name."""

    id: str
    payload: dict[str, Any] = field(default_factory=dict)
    items: int | None = None  # how many items (images, queries, pairs) it handles, when known at planning


@dataclass
class Stats:
    """Counters of one unit. `input == output + sum(rejected)` for stages that filter items."""

    input: int = 0
    output: int = 0
    rejected: Counter = field(default_factory=Counter)
    counters: Counter = field(default_factory=Counter)

    def reject(self, reason: str, n: int = 1) -> None:
        self.rejected[reason] += n

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "output": self.output,
            "rejected": dict(sorted(self.rejected.items())),
            "counters": dict(sorted(self.counters.items())),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Stats":
        return cls(d.get("input", 0), d.get("output", 0), Counter(d.get("rejected", {})), Counter(d.get("counters", {})))

    def __iadd__(self, other: "Stats") -> "Stats":
        self.input += other.input
        self.output += other.output
        self.rejected.update(other.rejected)
        self.counters.update(other.counters)
        return self


class Stage(ABC):
    """One transformation of the pipeline.

    Subclasses set `name`, `Settings` and `version` (bump it when the bytes a stage writes
    change for the same settings), and implement `plan` and `process`. `plan` returns waves:
    every unit of a wave runs after every unit of the previous wave has finished.
    """

    name: ClassVar[str]
    Settings: ClassVar[type[StageSettings]]
    version: ClassVar[str] = "1"
    #: True for stages that hold a model: executors run them on long-lived workers that call
    #: `setup` once, instead of one short task per unit.
    loads_model: ClassVar[bool] = False
    #: How many workers run this stage at once; the executor sets it before `setup` (a budget such
    #: as an endpoint's total concurrency is split between them).
    worker_count: int = 1
    #: What to check when most of the stage's input is rejected; None where rejecting is a choice (mine's band).
    reject_hint: str | None = None
    #: Finished run folders this run may read from (`megasynth run --reuse`), e.g. for their answer caches.
    reuse_runs: tuple[Path, ...] = ()

    def __init__(self, settings: StageSettings, inputs: dict[str, Path], output: Path):
        self.settings = settings
        self.inputs = {k: Path(v) for k, v in inputs.items()}
        self.output = Path(output)

    @classmethod
    def holds_model(cls, settings: StageSettings) -> bool:
        """Whether a stage with these settings loads a model (`loads_model`, unless its settings decide)."""
        return cls.loads_model

    def resources(self) -> Resources:
        return Resources()

    def fingerprint_extra(self) -> dict[str, Any]:
        """Anything besides settings and upstream that decides this stage's output (e.g. input file stats)."""
        return {}

    def reuse_key(self) -> dict[str, Any]:
        """The settings that must match exactly for a finished stage to stand in for this one."""
        return self.settings.model_dump(mode="json")

    def scope(self) -> dict[str, Any]:
        """How much of its work the stage does, when a larger scope holds a smaller one (neighbours searched
        to depth k hold those to depth k' < k); read from the stage's inputs, which are done when it is asked."""
        return {}

    def covers(self, done: dict[str, Any], wanted: dict[str, Any]) -> bool:
        """Whether outputs made at scope `done` hold everything scope `wanted` needs."""
        return done == wanted

    def check(self) -> None:
        """Validate settings against the world (files exist, models load) before any work; raise ValueError."""

    def environment(self) -> list[str]:
        """Names of environment variables a worker needs (e.g. an endpoint's key): sent from the driver, since a
        cluster's workers were started elsewhere and do not share its environment."""
        return []

    @abstractmethod
    def plan(self) -> list[list[Unit]]:
        """The units of this stage, in waves."""

    def setup(self) -> None:
        """Load models or other per-worker state; called once per worker before `process`."""

    @abstractmethod
    def process(self, unit: Unit) -> Stats:
        """Do one unit: write its outputs (atomically) and return its counters."""

    def finish(self) -> None:
        """Called once on the driver after every wave is done (e.g. to remove scratch files)."""

    def advance(self, items: int) -> None:
        """Report `items` more items of the current unit done; the executor shows them on the progress bar."""


# --- helpers every stage uses to write outputs safely -------------------------------------

TMP_MARK = ".tmp-"


def tmp_path_for(path: Path) -> Path:
    return path.with_name(f"{TMP_MARK}{os.getpid()}-{time.monotonic_ns()}-{path.name}")


@contextmanager
def atomic_path(path: Path | str, optional: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync and rename it into place.

    A crash leaves only a `.tmp-*` file behind, never a half-written output under the final
    name. A caller that wrote nothing there is an error (FileNotFoundError), unless `optional`,
    when nothing is renamed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    try:
        yield tmp
        if not tmp.exists():
            if optional:
                return
            raise FileNotFoundError(f"{path}: its temporary file {tmp.name} was never written, so nothing was put in place")
        if tmp.is_file():
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            if tmp.is_dir():
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink()


def write_bytes_atomic(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def remove_stale_tmp(folder: Path) -> int:
    """Delete temporary files a crashed run left in `folder` (recursively); return how many."""
    n = 0
    if folder.exists():
        for p in folder.rglob(f"{TMP_MARK}*"):
            if p.is_dir():
                import shutil

                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            n += 1
    return n
