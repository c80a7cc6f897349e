"""The run folder: where each stage writes, the ledger of finished units, and the run lock.

    OUT/catalog/ captions/ embeddings/ selection/ neighbours/ pairs/ annotations/ triplets/   stage outputs
    OUT/_state/{stage}/stage.json        fingerprints, settings, planned units; or a reference
                                         to the run folder whose finished stage this run reuses
    OUT/_state/{stage}/units/{unit}.json one per finished unit: fingerprint, counters, seconds
    OUT/_state/{stage}/logs/{unit}.log   what the unit logged (warnings from workers included)
    OUT/_state/lock                      held (flock) while a run is active

A unit is done when its record exists with the stage's current fingerprint. Records are
written by whichever worker ran the unit, after its outputs were renamed into place, so a
crash at any moment leaves either a finished unit or one that reruns from scratch. Every
file here is written whole under a temporary name and renamed into place: the safe way to
share state between the nodes of a cluster on a shared filesystem.

Two fingerprints per stage: `family` (settings, code version, inputs) decides whether a
finished stage can stand in for a wanted one at all; `fingerprint` (the family plus the
stage's `scope`, e.g. how many neighbours were searched) names exactly what was produced.
A finished stage whose family matches and whose scope covers the wanted one is reused.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.base import Stats, Unit, remove_stale_tmp, write_bytes_atomic

# The stages in pipeline order; runner.PIPELINE wires them (and checks it matches this).
STAGE_NAMES = ("ingest", "caption", "embed", "select", "search", "mine", "annotate", "write")


class RunLocked(RuntimeError):
    pass


def fingerprint(payload: Any) -> str:
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def write_json(path: Path, payload: Any) -> None:
    write_bytes_atomic(path, (json.dumps(payload, indent=1, sort_keys=True, default=str) + "\n").encode())


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

    def log_file(self, stage: str, unit_id: str) -> Path:
        return self.stage_dir(stage) / "logs" / f"{unit_id}.log"

    def stage_record(self, stage: str) -> dict | None:
        p = self.stage_dir(stage) / "stage.json"
        try:
            return json.loads(p.read_text())
        except FileNotFoundError:
            return None

    def source(self, stage: str) -> Path:
        """The run folder that holds this stage's outputs: this one, or the one it is reused from."""
        rec = self.stage_record(stage) or {}
        return Path(rec["source"]) if rec.get("source") else self.root

    def begin_stage(self, stage: str, rec: dict, output: Path, waves: list[list[Unit]]) -> None:
        """Record the plan. Outputs of another fingerprint are deleted only after the new record says so.

        `rec` holds `fingerprint`, `family`, `scope`, `upstream` (the fingerprint of the stage read,
        so a later redo of that stage leaves this one stale) and `settings`."""
        old = self.stage_record(stage)
        same = old is not None and not old.get("source") and old.get("fingerprint") == rec["fingerprint"] and not old.get("clearing")
        new = {
            **rec,
            "source": None,
            "units": [u.id for wave in waves for u in wave],
            "started": old.get("started") if same else time.time(),
            "finished": None,
            "failed": None,
        }
        if not same:
            self._clear(stage, output, new)
        remove_stale_tmp(output)
        remove_stale_tmp(self.stage_dir(stage) / "units")  # a record a killed worker was writing
        write_json(self.stage_dir(stage) / "stage.json", new)

    def reference(self, stage: str, source_root: Path, source_rec: dict, output: Path) -> None:
        """This run uses `source_root`'s finished stage as it is: nothing is copied, nothing there changes."""
        new = {k: source_rec.get(k) for k in ("fingerprint", "family", "scope", "upstream", "settings", "resources")}
        new.update(source=str(Path(source_root).resolve()), units=[], started=time.time(), finished=time.time(), failed=None)
        old = self.stage_record(stage)
        if old is None or not old.get("source"):
            self._clear(stage, output, new)  # this folder's own outputs of the stage, if any
        write_json(self.stage_dir(stage) / "stage.json", new)

    def _clear(self, stage: str, output: Path, new: dict) -> None:
        """Intent first: once the record names the new fingerprint, old units and outputs can never pass as its own."""
        write_json(self.stage_dir(stage) / "stage.json", {**new, "clearing": True})
        shutil.rmtree(self.stage_dir(stage) / "units", ignore_errors=True)
        shutil.rmtree(self.stage_dir(stage) / "logs", ignore_errors=True)
        shutil.rmtree(output, ignore_errors=True)

    def replan(self, stage: str, waves: list[list[Unit]]) -> None:
        """Later waves are planned from earlier waves' outputs: record the units as they become known."""
        rec = self.stage_record(stage)
        rec["units"] = [u.id for wave in waves for u in wave]
        write_json(self.stage_dir(stage) / "stage.json", rec)

    def finish_stage(self, stage: str, output: Path | None = None) -> None:
        """Every unit is done, so no worker writes any more: what lost workers left half-written goes too."""
        for folder in (self.stage_dir(stage) / "units", output):
            if folder is not None:
                remove_stale_tmp(folder)
        rec = self.stage_record(stage)
        rec["finished"] = time.time()
        write_json(self.stage_dir(stage) / "stage.json", rec)

    def fail_stage(self, stage: str, message: str) -> None:
        """Why the stage stopped, for `megasynth status`; cleared when the stage runs again."""
        rec = self.stage_record(stage)
        if rec is not None:
            rec["failed"] = {"message": message, "time": time.time()}
            write_json(self.stage_dir(stage) / "stage.json", rec)

    def unit_record(self, stage: str, unit_id: str) -> dict | None:
        try:
            return json.loads(self.unit_file(stage, unit_id).read_text())
        except (FileNotFoundError, json.JSONDecodeError):  # absent, or cut short by a crash: not done
            return None

    def is_done(self, stage: str, unit_id: str, fp: str) -> bool:
        rec = self.unit_record(stage, unit_id)
        return rec is not None and rec.get("fingerprint") == fp

    def record(self, stage: str, unit_id: str, fp: str, stats: Stats, seconds: float) -> dict:
        rec = {"unit": unit_id, "fingerprint": fp, "seconds": round(seconds, 3), **stats.to_dict()}
        write_json(self.unit_file(stage, unit_id), rec)
        return rec

    def unit_records(self, stage: str) -> list[dict]:
        rec = self.stage_record(stage)
        if rec is None:
            return []
        if rec.get("source"):
            src = Ledger(Path(rec["source"]))
            src_rec = src.stage_record(stage)
            return src.unit_records(stage) if src_rec and src_rec.get("fingerprint") == rec["fingerprint"] else []
        records = (self.unit_record(stage, uid) for uid in rec["units"])
        return [r for r in records if r is not None and r.get("fingerprint") == rec["fingerprint"]]

    def summary(self, stage: str) -> dict:
        """Counters of a stage summed over its finished units (those of the source run for a reused stage)."""
        rec = self.stage_record(stage)
        source = None
        if rec and rec.get("source"):
            source = rec["source"]
            src_rec = Ledger(Path(source)).stage_record(stage)
            if not src_rec or src_rec.get("fingerprint") != rec["fingerprint"]:
                rec = None  # the source run replaced that stage since: nothing stands here any more
            else:
                rec = src_rec
        records = self.unit_records(stage)
        total = Stats()
        for r in records:
            total += Stats.from_dict(r)
        planned = len(rec["units"]) if rec else 0
        return {
            "done": bool(rec) and rec.get("finished") is not None and not rec.get("clearing") and len(records) == planned,
            **total.to_dict(),
            "seconds": round(sum(r["seconds"] for r in records), 3),
            "units": {"done": len(records), "total": planned},
            "source": source,
            "failed": (self.stage_record(stage) or {}).get("failed"),
        }

    def summary_chain(self, names: tuple[str, ...] = STAGE_NAMES) -> dict[str, dict]:
        """Every stage's summary in pipeline order. A stage whose upstream stage was redone under other
        settings since it ran, or is not done, is `stale`: not done until it runs again."""
        out: dict[str, dict] = {}
        upstream: tuple[dict | None, bool] | None = None  # the previous stage's record and whether it is done
        for name in names:
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


class RunLock:
    """An exclusive lock on a run folder; released by the OS if the process dies.

    flock can be local to one node on a shared filesystem: it stops a second run from the
    same machine, which is the common mistake; the lock file names the holder's host and pid."""

    def __init__(self, root: Path):
        self.path = root / "_state" / "lock"
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 128).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunLocked(f"another megasynth run is using {self.path.parent.parent} ({holder}); wait for it or use another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
