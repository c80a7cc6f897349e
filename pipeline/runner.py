"""Run the stages in order over one run folder, resuming from whatever is already done.

Stage by stage, the runner decides where the stage's outputs come from:
1. this folder, if its finished stage has the same family fingerprint and covers what is asked;
2. else a `--reuse` run folder whose finished stage does: used by reference (nothing copied,
   nothing there modified or deleted), and later stages read it from there;
3. else the stage runs here, resuming the units already done with the same fingerprint.
A finished stage of this folder made with other settings is never replaced silently: without
`replace` the run stops first and says what would be replaced.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from pipeline import report
from pipeline.config import RunConfig, dump_config
from pipeline.executors import Policy, StageSpec, make_executor
from pipeline.rundir import STAGE_NAMES, Ledger, RunLock, fingerprint
from stages.annotate import AnnotateStage
from stages.base import Stage, Stats, Unit, write_bytes_atomic
from stages.caption import CaptionStage
from stages.embed import EmbedStage
from stages.ingest import IngestStage
from stages.mine import MineStage
from stages.search import SearchStage
from stages.select import SelectStage
from stages.write import WriteStage

log = logging.getLogger("megasynth")


@dataclass(frozen=True)
class StageWiring:
    cls: type[Stage]
    inputs: tuple[str, ...]  # outputs of earlier stages this stage reads
    output: str  # the folder it writes


# The pipeline, top to bottom. Each stage's fingerprint folds in the one above it, so a
# changed setting redoes exactly its own stage and everything below. Besides these inputs,
# caption and annotate get the run's answer `cache` folder and write a `scratch` folder of its own.
PIPELINE: tuple[StageWiring, ...] = (
    StageWiring(IngestStage, (), "catalog"),
    StageWiring(CaptionStage, ("catalog",), "captions"),
    StageWiring(EmbedStage, ("catalog", "captions"), "embeddings"),
    StageWiring(SelectStage, ("catalog", "embeddings"), "selection"),
    StageWiring(SearchStage, ("catalog", "embeddings", "selection"), "neighbours"),
    StageWiring(MineStage, ("catalog", "neighbours", "selection"), "pairs"),
    StageWiring(AnnotateStage, ("catalog", "captions", "pairs"), "annotations"),
    StageWiring(WriteStage, ("catalog", "captions", "embeddings", "annotations"), "triplets"),
)
assert tuple(w.cls.name for w in PIPELINE) == STAGE_NAMES, "rundir.STAGE_NAMES must list PIPELINE's stages in order"


class StageOrderError(RuntimeError):
    pass


class ReplaceRefused(RuntimeError):
    pass


def build_stage(cfg: RunConfig, w: StageWiring, out: Path, locations: dict[str, Path], reuse: tuple[Path, ...] = ()) -> Stage:
    inputs = {name: locations.get(name, out / name) for name in w.inputs}
    if w.cls in (CaptionStage, AnnotateStage):
        inputs["cache"] = out / "cache"  # outlives reruns of annotate; other runs' caches are read through reuse_runs
    if w.cls is WriteStage:
        inputs["scratch"] = Ledger(out).stage_dir(w.cls.name) / "scratch"
    stage = w.cls(cfg.stage_settings(w.cls.name), inputs, out / w.output)
    stage.reuse_runs = tuple(reuse)
    return stage


def family_of(stage: Stage, upstream: str) -> str:
    return fingerprint({"stage": stage.name, "version": stage.version, "settings": stage.reuse_key(),
                        "extra": stage.fingerprint_extra(), "upstream": upstream})  # fmt: skip


def identity_of(family: str, scope: dict) -> str:
    return fingerprint({"family": family, "scope": scope}) if scope else family


def run(cfg: RunConfig, out: Path, only: str | None = None, progress: bool = True, reuse: tuple[Path, ...] | list[Path] = (),
        replace: bool = False) -> dict:  # fmt: skip
    """Run the pipeline (or one stage) and return the per-stage summary. Raises on a bad setup before writing anything."""
    out = Path(out).resolve()
    reuse = tuple(_reusable(Path(r), out) for r in reuse)
    if only is not None and only not in STAGE_NAMES:
        raise StageOrderError(f"unknown stage {only!r}; stages: {', '.join(STAGE_NAMES)}")
    for w in PIPELINE:  # every setting checked against the world before anything is written
        if only is None or w.cls.name == only:
            build_stage(cfg, w, out, {}).check()
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out):
        write_bytes_atomic(out / "config.yaml", dump_config(cfg).encode())
        ex = cfg.executor
        policy = Policy(ex.unit_retries, ex.retry_pause_s, ex.lost_retries, ex.placement_timeout_s, ex.max_in_flight)
        kwargs = {} if ex.kind == "local" else dict(address=ex.ray_address, num_cpus=ex.num_cpus, num_gpus=ex.num_gpus, actors=ex.actors)
        executor = make_executor(ex.kind, policy, **kwargs)
        try:
            t0 = time.time()
            wrote = _run_stages(cfg, out, only, progress, reuse, replace, executor)
            summary = report.status(out)["stages"]
            if wrote and summary["write"]["done"]:
                report.write_card(out)
            stats = {"stages": summary, "wall_seconds": round(time.time() - t0, 1), "reuse": [str(r) for r in reuse]}
            write_bytes_atomic(out / "stats.json", (json.dumps(stats, indent=1) + "\n").encode())
            return summary
        finally:
            executor.close()


def _reusable(run: Path, out: Path) -> Path:
    run = run.resolve()
    if not (run / "_state").is_dir():
        raise ValueError(f"--reuse {run}: not a megasynth run folder (no _state/)")
    if run == out:
        raise ValueError(f"--reuse {run}: that is the run folder itself")
    return run


def _run_stages(cfg: RunConfig, out: Path, only: str | None, progress: bool, reuse: tuple[Path, ...], replace: bool, executor) -> bool:
    """Resolve and run the stages in order; True if the write stage's outputs are this folder's own."""
    ledger = Ledger(out)
    locations: dict[str, Path] = {}
    upstream = ""
    for w in PIPELINE:
        name = w.cls.name
        stage = build_stage(cfg, w, out, locations, reuse)
        family = family_of(stage, upstream)
        scope = stage.scope()
        found = _finished(stage, family, scope, (out, *reuse))
        if found is not None:
            holder, rec = found
            here = ledger.stage_record(name)
            if holder != ledger.source(name) or here is None or here.get("fingerprint") != rec["fingerprint"]:  # e.g. the source redid it
                _guard(ledger, name, stage, rec["fingerprint"], replace)
                ledger.reference(name, holder, rec, out / w.output)
                log.info("%s: reusing the finished stage of %s", name, holder)
            elif holder == out:
                stage.finish()  # idempotent clean-up a crash may have cut short
            locations[w.output] = holder / w.output
            upstream = rec["fingerprint"]
            if name == only:  # asked to run a stage that is done: nothing to do
                return False
            continue
        if only is not None and name != only:
            raise StageOrderError(f"stage {only} needs {name} done with the current settings first: run `megasynth run` "
                                  f"with --stage {name} (or without --stage)")  # fmt: skip
        identity = identity_of(family, scope)
        _guard(ledger, name, stage, identity, replace)
        spec = StageSpec(type(stage), stage.settings, stage.inputs, stage.output, identity, out, reuse)
        rec = {"fingerprint": identity, "family": family, "scope": scope, "upstream": upstream or None,
               "settings": stage.settings.model_dump(mode="json"), "resources": asdict(stage.resources())}  # fmt: skip
        try:
            _run_stage(spec, stage, rec, ledger, executor, progress, cfg.executor.max_reject_share)
        except BaseException as e:
            if not isinstance(e, KeyboardInterrupt) and not (ledger.stage_record(name) or {}).get("failed"):
                ledger.fail_stage(name, str(e) if isinstance(e, RejectAlarm) else f"{name}: {type(e).__name__}: {e}")
            raise
        locations[w.output] = out / w.output
        upstream = identity
        if name == only:
            return False
    return locations.get("triplets") == out / "triplets"


def _finished(stage: Stage, family: str, scope: dict, roots: tuple[Path, ...]) -> tuple[Path, dict] | None:
    """The first run folder (this one first) whose finished stage can stand in: same family, covering scope.
    Returns the folder that really holds the outputs (a reused stage may itself be reused) and its record."""
    for root in roots:
        ledger = Ledger(root)
        rec = ledger.stage_record(stage.name)
        if rec is None or rec.get("family") != family or not stage.covers(rec.get("scope") or {}, scope):
            continue
        if ledger.summary(stage.name)["done"]:
            holder = ledger.source(stage.name)
            return holder, Ledger(holder).stage_record(stage.name)
    return None


def _guard(ledger: Ledger, name: str, stage: Stage, identity: str, replace: bool) -> None:
    """Refuse to replace a finished stage of this folder made with other settings, unless asked to."""
    old = ledger.stage_record(name)
    if replace or old is None or old.get("fingerprint") == identity:
        return
    chain = ledger.summary_chain()
    if not chain[name]["done"]:
        return  # unfinished or stale: nothing finished is lost
    after = [n for n in STAGE_NAMES[STAGE_NAMES.index(name) :] if chain[n]["done"]]
    changed = _changes(old.get("settings") or {}, stage.settings.model_dump(mode="json"), name)
    why = ", ".join(changed) if changed else "its input changed (a stage above it was redone)"
    raise ReplaceRefused(
        f"{ledger.root} holds finished work made with other settings: {name} ({why}). This run would replace "
        f"{', '.join(after)}. Rerun with --replace to replace it, or run this variant in its own folder and "
        f"share the finished work: --out NEW_FOLDER --reuse {ledger.root}"
    )


def _changes(old: dict, new: dict, prefix: str) -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changes(a, b, f"{prefix}.{key}")
        elif a != b:
            out.append(f"{prefix}.{key}: {json.dumps(a)} -> {json.dumps(b)}")
    return out


def _run_stage(spec: StageSpec, stage: Stage, rec: dict, ledger: Ledger, executor, progress: bool, max_reject_share: float | None) -> None:
    waves = stage.plan()
    ledger.begin_stage(spec.name, rec, spec.output, waves)
    bar = _Bar(spec.name, waves, progress)
    guard = _RejectGuard(spec.name, stage.reject_hint, max_reject_share)

    def finished(unit: Unit, rec: dict | None) -> None:
        bar.finished(unit, rec)
        guard.add(rec)

    try:
        for i in range(len(waves)):
            if i > 0:  # later waves are planned from the outputs of earlier ones
                waves = stage.plan()
                ledger.replan(spec.name, waves)
                bar.replan(waves)
            todo = [u for u in waves[i] if not ledger.is_done(spec.name, u.id, spec.fingerprint)]
            for u in waves[i]:
                if u not in todo:
                    finished(u, ledger.unit_record(spec.name, u.id))
            executor.run(spec, todo, finished, bar.advance)
        guard.check(final=True)
    finally:
        bar.close()
    ledger.finish_stage(spec.name, spec.output)
    stage.finish()


class RejectAlarm(RuntimeError):
    pass


REJECT_CHECK_ITEMS = 200  # items a stage has seen before its reject share is judged (or all of them, if fewer)


def reject_alarm(stage: str, hint: str | None, total: Stats, limit: float | None) -> str | None:
    """One line when a stage whose rejects are losses rejected more than `limit` of what it saw, else None."""
    if hint is None or limit is None or total.input == 0:
        return None
    rejected = sum(total.rejected.values())
    if rejected / total.input <= limit:
        return None
    top = ", ".join(f"{reason} {n}" for reason, n in total.rejected.most_common(3))
    return (f"{stage} rejected {rejected} of the first {total.input} items ({rejected / total.input:.0%}, more than "
            f"executor.max_reject_share {limit:g}); most: {top}. {hint}")  # fmt: skip


class _RejectGuard:
    """Judges a stage's reject share once, on its first units (or at its end when it is small), and stops the run."""

    def __init__(self, stage: str, hint: str | None, limit: float | None):
        self.stage, self.hint, self.limit = stage, hint, limit
        self.total = Stats()
        self.judged = hint is None or limit is None

    def add(self, rec: dict | None) -> None:
        if self.judged or rec is None:
            return
        self.total += Stats.from_dict(rec)
        if self.total.input >= REJECT_CHECK_ITEMS:
            self.check(final=True)

    def check(self, final: bool) -> None:
        if self.judged or not final:
            return
        self.judged = True
        if line := reject_alarm(self.stage, self.hint, self.total, self.limit):
            raise RejectAlarm(line)


class _Bar:
    """A stage's progress bar: items (images, queries, pairs) when every unit knows its count, else units."""

    def __init__(self, name: str, waves: list[list[Unit]], enabled: bool):
        self.name = name
        self.reported: dict[str, int] = {}
        self.output = 0
        self.bar = tqdm(desc=f"{name:>8}", disable=not enabled, dynamic_ncols=True)
        self.replan(waves)

    def replan(self, waves: list[list[Unit]]) -> None:
        units = [u for wave in waves for u in wave]
        self.by_items = bool(units) and all(u.items is not None for u in units)
        self.bar.unit = "item" if self.by_items else "unit"
        self.bar.total = sum(u.items for u in units) if self.by_items else len(units)
        self.bar.refresh()

    def _size(self, unit: Unit) -> int:
        return unit.items if self.by_items else 1

    def advance(self, unit: Unit, n: int) -> None:
        if not self.by_items:
            return
        n = min(n, self._size(unit) - self.reported.get(unit.id, 0))
        self.reported[unit.id] = self.reported.get(unit.id, 0) + n
        self.bar.update(n)

    def finished(self, unit: Unit, rec: dict | None) -> None:
        self.bar.update(self._size(unit) - self.reported.get(unit.id, 0))
        self.reported[unit.id] = self._size(unit)
        if rec:
            self.output += rec["output"]
            self.bar.set_postfix_str(f"output={self.output}", refresh=False)

    def close(self) -> None:
        self.bar.close()
