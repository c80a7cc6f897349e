"""The run folder: where each stage writes, the ledger of finished units, and the run lock.

    OUT/catalog/ embeddings/ pairs/ annotations/ triplets/     stage outputs
    OUT/_state/{stage}/stage.json                             fingerprint and planned units
    OUT/_state/{stage}/units/{unit}.json                      one per finished unit: fingerprint, counters, seconds
    OUT/_state/lock                                            held (flock) while a run is active

A unit is done when its record exists with the stage's current fingerprint. Records are
written by whichever worker ran the unit, after its outputs were renamed into place, so a
crash at any moment leaves either a finished unit or one that reruns from scratch.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.base import Stats, Unit, remove_stale_tmp, write_bytes_atomic


# The stages in pipeline order; runner.PIPELINE wires them (and checks it matches this).
STAGE_NAMES = ("ingest", "embed", "mine", "annotate", "write")


class RunLocked(RuntimeError):
    pass


def fingerprint(payload: Any) -> str:
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class Ledger:
    root: Path  # the run folder

    @property
    def state(self) -> Path:
        return self.root / "_state"

    def stage_dir(self, stage: str) -> Path:
        return self.state / stage

    def unit_file(self, stage: str, unit_id: str) -> Path:
        return self.stage_dir(stage) / "units" / f"{unit_id}.json"

    def stage_record(self, stage: str) -> dict | None:
        p = self.stage_dir(stage) / "stage.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def begin_stage(self, stage: str, fp: str, output: Path, waves: list[list[Unit]], settings: dict, upstream: str | None = None) -> None:
        """Record the plan; if the fingerprint changed, drop the stage's old outputs and records first.

        `upstream` is the fingerprint of the stage this one reads: when that stage is later redone
        under other settings, this one is stale until it runs again (see `summary_chain`)."""
        rec = self.stage_record(stage)
        if rec is not None and rec.get("fingerprint") != fp:
            shutil.rmtree(output, ignore_errors=True)
            shutil.rmtree(self.stage_dir(stage) / "units", ignore_errors=True)
        remove_stale_tmp(output)
        new = {
            "fingerprint": fp,
            "upstream": upstream,
            "settings": settings,
            "units": [u.id for wave in waves for u in wave],
            "started": (rec or {}).get("started") if rec and rec.get("fingerprint") == fp else time.time(),
            "finished": None,
        }
        self._write(self.stage_dir(stage) / "stage.json", new)

    def replan(self, stage: str, waves: list[list[Unit]]) -> None:
        """Later waves are planned from earlier waves' outputs: record the units as they become known."""
        rec = self.stage_record(stage)
        rec["units"] = [u.id for wave in waves for u in wave]
        self._write(self.stage_dir(stage) / "stage.json", rec)

    def finish_stage(self, stage: str) -> None:
        rec = self.stage_record(stage)
        rec["finished"] = time.time()
        self._write(self.stage_dir(stage) / "stage.json", rec)

    def is_done(self, stage: str, unit_id: str, fp: str) -> bool:
        p = self.unit_file(stage, unit_id)
        if not p.is_file():
            return False
        try:
            return json.loads(p.read_text()).get("fingerprint") == fp
        except json.JSONDecodeError:
            return False

    def record(self, stage: str, unit_id: str, fp: str, stats: Stats, seconds: float) -> dict:
        rec = {"unit": unit_id, "fingerprint": fp, "seconds": round(seconds, 3), **stats.to_dict()}
        self._write(self.unit_file(stage, unit_id), rec)
        return rec

    def unit_records(self, stage: str) -> list[dict]:
        rec = self.stage_record(stage)
        if rec is None:
            return []
        out = []
        for uid in rec["units"]:
            p = self.unit_file(stage, uid)
            if p.is_file():
                r = json.loads(p.read_text())
                if r.get("fingerprint") == rec["fingerprint"]:
                    out.append(r)
        return out

    def summary(self, stage: str) -> dict:
        """Counters of a stage summed over its finished units."""
        rec = self.stage_record(stage)
        records = self.unit_records(stage)
        total = Stats()
        for r in records:
            total += Stats.from_dict(r)
        planned = len(rec["units"]) if rec else 0
        return {
            "done": bool(rec) and rec.get("finished") is not None and len(records) == planned,
            **total.to_dict(),
            "seconds": round(sum(r["seconds"] for r in records), 3),
            "units": {"done": len(records), "total": planned},
        }

    def summary_chain(self) -> dict[str, dict]:
        """Every stage's summary in pipeline order. A stage whose upstream stage was redone under other
        settings since it ran, or is not done, is `stale`: not done until it runs again."""
        out: dict[str, dict] = {}
        upstream: tuple[dict | None, bool] | None = None  # the previous stage's record and whether it is done
        for name in STAGE_NAMES:
            s, rec = self.summary(name), self.stage_record(name)
            s["stale"] = False
            if upstream is not None and rec is not None:
                prev, prev_done = upstream
                redone = prev is None or ("upstream" in rec and rec["upstream"] != prev["fingerprint"])
                s["stale"] = not prev_done or redone
                s["done"] = s["done"] and not s["stale"]
            out[name] = s
            upstream = (rec, s["done"])
        return out

    @staticmethod
    def _write(path: Path, payload: dict) -> None:
        write_bytes_atomic(path, (json.dumps(payload, indent=1, sort_keys=True, default=str) + "\n").encode())


class RunLock:
    """An exclusive lock on a run folder; released by the OS if the process dies."""

    def __init__(self, root: Path):
        self.path = root / "_state" / "lock"
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunLocked(f"another megasynth run is using {self.path.parent.parent} (pid {holder}); wait for it or use another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
