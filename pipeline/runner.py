"""Run the stages in order over one run folder, resuming from whatever is already done."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pipeline import report
from pipeline.config import RunConfig, dump_config
from pipeline.executors import StageSpec, make_executor
from pipeline.rundir import STAGE_NAMES, Ledger, RunLock, fingerprint
from stages.annotate import AnnotateStage
from stages.base import Stage
from stages.embed import EmbedStage
from stages.ingest import IngestStage
from stages.mine import MineStage
from stages.write import WriteStage

log = logging.getLogger("megasynth")


@dataclass(frozen=True)
class StageWiring:
    cls: type[Stage]
    inputs: tuple[str, ...]  # folders of the run this stage reads
    output: str  # the folder it writes


# The pipeline, top to bottom. Each stage's fingerprint folds in the one above it, so a
# changed setting redoes exactly its own stage and everything below.
PIPELINE: tuple[StageWiring, ...] = (
    StageWiring(IngestStage, (), "catalog"),
    StageWiring(EmbedStage, ("catalog",), "embeddings"),
    StageWiring(MineStage, ("catalog", "embeddings"), "pairs"),
    StageWiring(AnnotateStage, ("catalog", "pairs", "cache"), "annotations"),  # cache/ outlives reruns of annotate
    StageWiring(WriteStage, ("catalog", "embeddings", "annotations"), "triplets"),
)
assert tuple(w.cls.name for w in PIPELINE) == STAGE_NAMES, "rundir.STAGE_NAMES must list PIPELINE's stages in order"


class StageOrderError(RuntimeError):
    pass


def build_stages(cfg: RunConfig, out: Path) -> list[Stage]:
    return [
        w.cls(cfg.stage_settings(w.cls.name), {name: out / name for name in w.inputs}, out / w.output)
        for w in PIPELINE
    ]


def specs(cfg: RunConfig, out: Path, stages: list[Stage]) -> list[StageSpec]:
    """Stage recipes with their fingerprints, each folding in the fingerprint of the stage above."""
    result, upstream = [], ""
    for stage in stages:
        fp = fingerprint(
            {
                "stage": stage.name,
                "version": stage.version,
                "settings": stage.settings.model_dump(mode="json"),
                "extra": stage.fingerprint_extra(),
                "upstream": upstream,
            }
        )
        result.append(StageSpec(type(stage), stage.settings, stage.inputs, stage.output, fp, out))
        upstream = fp
    return result


def run(cfg: RunConfig, out: Path, only: str | None = None, progress: bool = True) -> dict:
    """Run the pipeline (or one stage) and return the per-stage summary. Raises on a bad setup before writing anything."""
    out = Path(out)
    stages = build_stages(cfg, out)
    for stage in stages:
        if only is None or stage.name == only:
            stage.check()
    all_specs = specs(cfg, out, stages)
    ledger = Ledger(out)
    selected = [s for s in all_specs if only is None or s.name == only]
    if only is not None:
        _check_upstream_done(ledger, all_specs, only)

    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out):
        (out / "config.yaml").write_text(dump_config(cfg))
        ex = cfg.executor
        executor = make_executor(ex.kind, **({} if ex.kind == "local" else dict(address=ex.ray_address, num_cpus=ex.num_cpus, num_gpus=ex.num_gpus, actors=ex.actors)))
        try:
            t0 = time.time()
            for i, (spec, stage) in enumerate(zip(all_specs, stages)):
                if spec in selected:
                    _run_stage(spec, stage, ledger, executor, progress, upstream=all_specs[i - 1].fingerprint if i else None)
            summary = report.status(out)["stages"]
            if summary["write"]["done"]:
                report.write_card(out)
            (out / "stats.json").write_text(json.dumps({"stages": summary, "wall_seconds": round(time.time() - t0, 1)}, indent=1) + "\n")
            return summary
        finally:
            executor.close()


def _run_stage(spec: StageSpec, stage: Stage, ledger: Ledger, executor, progress: bool, upstream: str | None) -> None:
    waves = stage.plan()
    ledger.begin_stage(spec.name, spec.fingerprint, spec.output, waves, spec.settings.model_dump(mode="json"), upstream)
    with tqdm(total=sum(map(len, waves)), desc=f"{spec.name:>8}", unit="unit", disable=not progress, dynamic_ncols=True) as bar:
        for i in range(len(waves)):
            if i > 0:  # later waves are planned from the outputs of earlier ones
                waves = stage.plan()
                ledger.replan(spec.name, waves)
                bar.total = sum(map(len, waves))
                bar.refresh()
            wave = waves[i]
            todo = [u for u in wave if not ledger.is_done(spec.name, u.id, spec.fingerprint)]
            bar.update(len(wave) - len(todo))
            output = [ledger.summary(spec.name)["output"]]  # the stage's output so far, shown on the bar

            def advance(rec: dict) -> None:
                output[0] += rec["output"]
                bar.set_postfix_str(f"output={output[0]}", refresh=False)
                bar.update(1)

            executor.run(spec, todo, advance)
    ledger.finish_stage(spec.name)


def _check_upstream_done(ledger: Ledger, all_specs: list[StageSpec], only: str) -> None:
    if only not in STAGE_NAMES:
        raise StageOrderError(f"unknown stage {only!r}; stages: {', '.join(STAGE_NAMES)}")
    chain = ledger.summary_chain()
    for spec in all_specs:
        if spec.name == only:
            return
        rec = ledger.stage_record(spec.name)
        if rec is None or rec["fingerprint"] != spec.fingerprint or not chain[spec.name]["done"]:
            raise StageOrderError(f"stage {only} needs {spec.name} done with the current settings first: run `megasynth run` with --stage {spec.name} (or without --stage)")
