"""The driver at cluster scale: planning a 20M-image run, and scheduling units through Ray.

    python -m bench.driver [--images 20M] [--units 10000] [--cpu]

1. plan: a synthetic run folder holding what a 20M-image run of `configs/megapairs.yaml` has
   when each stage plans (corpus shards, catalog, embedding spaces, neighbour lists, pairs,
   annotations, write notes: real parquet files with the real row counts, ids included), then
   every stage's `plan()` as the runner calls it, in a child process whose peak RSS is read
   from the kernel (ru_maxrss). The child's RSS after its imports is reported beside it.
2. schedule: `--units` units that do nothing, run through the Ray executor on an embedded
   cluster with the ledger writing a record per unit, as a stage's units are. Overhead per unit
   is wall time over units.

Targets (issue 8): driver peak RSS <= 2 GB; scheduling overhead <= 5 ms per unit.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import write_result

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "megapairs.yaml"
SHARD_IMAGES = 10_000  # img2dataset's default samples per shard
PAPER_IMAGES = 20_000_000  # the corpus configs/megapairs.yaml is sized for


# --- 1. planning ---------------------------------------------------------------------------------


def build_run(folder: Path, images: int, queries: int, pairs_per_query: int, spaces: list[str], units: dict[str, int]) -> None:
    """The files each stage's plan reads, at full size; contents are real but minimal (ids, statuses)."""
    from stages import annotations, catalog, pairs, selection

    shards = -(-images // SHARD_IMAGES)
    corpus = folder / "corpus"
    corpus.mkdir(parents=True)
    empty_tar = bytes(10240)  # an empty tar archive: ingest's plan lists shards, it does not read them
    for s in range(shards):
        (corpus / f"{s:05d}.tar").write_bytes(empty_tar)
    cat = folder / "catalog"
    cat.mkdir()
    for s in range(shards):
        n = min(SHARD_IMAGES, images - s * SHARD_IMAGES)
        ids = pa.array([f"{s:05d}/{i:09d}" for i in range(n)], pa.string())
        ok = pa.array([catalog.OK] * n, pa.string())
        cols = {f.name: pa.nulls(n, f.type) for f in catalog.SCHEMA}
        cols.update(id=ids, status=ok)
        table = pa.table(cols, schema=catalog.SCHEMA).replace_schema_metadata({catalog.OK_ROWS_KEY: str(n).encode()})
        pq.write_table(table, catalog.catalog_file(cat, f"{s:05d}"), compression="zstd")
    selection.write_manifest(folder / "selection", selection.EVERYTHING)  # no select queries: every image takes part
    for space in spaces:
        (folder / "embeddings" / space).mkdir(parents=True)
        (folder / "embeddings" / space / "space.json").write_text(json.dumps({"dim": 768, "model": "synthetic"}))
    for stage, schema, count, name in (
        ("neighbours", None, queries, "queries"),
        ("pairs", pairs.SCHEMA, queries * pairs_per_query, "queries"),
        ("annotations", annotations.SCHEMA, queries * pairs_per_query, "pairs"),
    ):
        out = folder / stage
        out.mkdir()
        per = -(-count // units[stage])
        for u in range(units[stage]):
            n = max(0, min(per, count - u * per))
            if schema is None:
                table = pa.table({"query_id": pa.array([f"q{u}-{i}" for i in range(n)], pa.string())})
            else:
                cols = {f.name: pa.nulls(n, f.type) for f in schema}
                cols[schema.names[0]] = pa.array([f"{u:05d}-{i:09d}" for i in range(n)], pa.string())
                table = pa.table(cols, schema=schema)
            pq.write_table(table, out / f"{name}-{u:05d}.parquet", row_group_size=4096)


def plan_child(folder: Path) -> None:
    """Runs in the child: every stage's plan over the synthetic run, as the runner calls it; prints JSON."""
    t_import = time.perf_counter()
    from pipeline import runner
    from pipeline.config import load_config

    cfg = load_config(CONFIG, corpus=[str(folder / "corpus" / "*.tar")])
    rss_after_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    planned = {}
    locations = {w.output: folder / w.output for w in runner.PIPELINE}
    for w in runner.PIPELINE:
        stage = runner.build_stage(cfg, w, folder, locations)
        t = time.perf_counter()
        waves = stage.plan()
        planned[w.cls.name] = {"units": sum(len(wave) for wave in waves), "seconds": round(time.perf_counter() - t, 3)}
    print(json.dumps({
        "plan_seconds": round(time.perf_counter() - t0, 2),
        "import_seconds": round(t0 - t_import, 2),
        "rss_after_imports_bytes": rss_after_imports,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "stages": planned,
    }))  # fmt: skip


def bench_plan(images: int, keep: Path | None) -> dict:
    cfg = __import__("yaml").safe_load(CONFIG.read_text())
    # The config's query count is for its 20M-image corpus; a smaller trial keeps the same share.
    queries = int(cfg["mine"]["queries"]) * images // PAPER_IMAGES
    spaces = sorted(cfg["embed"]["spaces"])
    folder = Path(keep or tempfile.mkdtemp(prefix="megasynth-driver-bench-"))
    t0 = time.perf_counter()
    # Files per stage as a run of that config lays them out: one neighbours and pairs file per search
    # unit; annotation files one per annotate unit.
    search_units = -(-queries // int(cfg["mine"].get("queries_per_unit", 100_000)))
    pairs_total = queries * int(cfg["mine"]["pairs_per_query"])
    annotate_units = -(-pairs_total // int(cfg["annotate"].get("pairs_per_unit", 10_000)))
    units = {"neighbours": search_units, "pairs": search_units, "annotations": annotate_units}
    build_run(folder, images, queries, int(cfg["mine"]["pairs_per_query"]), spaces, units)
    built = time.perf_counter() - t0
    proc = subprocess.run([sys.executable, "-m", "bench.driver", "--plan-child", str(folder)], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(images=images, queries=queries, pairs=pairs_total, synthetic_build_seconds=round(built, 1), files=units)
    if keep is None:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    return result


# --- 2. scheduling -------------------------------------------------------------------------------


def bench_schedule(n_units: int, num_cpus: int | None) -> dict:
    from pipeline.executors import Policy, RayExecutor, StageSpec
    from stages.base import Stage, StageSettings, Stats, Unit

    class NoopSettings(StageSettings):
        pass

    class Noop(Stage):  # the unit of work is nothing: what is measured is everything around it
        name = "noop"
        Settings = NoopSettings

        def plan(self):
            return [[Unit(f"u{i:06d}") for i in range(n_units)]]

        def process(self, unit):
            return Stats()

    run_dir = Path(tempfile.mkdtemp(prefix="megasynth-schedule-bench-"))
    stage = Noop(NoopSettings(), {}, run_dir / "out")
    spec = StageSpec(Noop, stage.settings, {}, run_dir / "out", "fp", run_dir)
    units = stage.plan()[0]
    t_start = time.perf_counter()
    ex = RayExecutor(num_cpus=num_cpus, policy=Policy())
    started = time.perf_counter() - t_start
    done = []
    try:
        ex.run(spec, units[: min(200, n_units)], lambda u, rec: None)  # warm the worker pool
        t0 = time.perf_counter()
        ex.run(spec, units, lambda u, rec: done.append(u.id), lambda u, n: None)  # as the runner calls it, progress included
        wall = time.perf_counter() - t0
    finally:
        ex.close()
    records = len(list((run_dir / "_state" / "noop" / "units").glob("*.json")))
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "units": n_units,
        "done": len(done),
        "ledger_records": records,
        "wall_seconds": round(wall, 2),
        "ms_per_unit": round(1000 * wall / n_units, 3),
        "ray_start_seconds": round(started, 2),
        "driver_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def main(argv: list[str] | None = None) -> Path | None:
    p = argparse.ArgumentParser(prog="megasynth bench driver", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default="20M", help="corpus size to plan (default 20M)")
    p.add_argument("--units", type=int, default=10_000, help="no-op units to schedule (default 10000)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded Ray cluster (default: all)")
    p.add_argument("--keep", type=Path, default=None, help="build the synthetic run here and keep it")
    p.add_argument("--cpu", action="store_true", help="accepted for `bench.run --cpu`; this benchmark is the same everywhere")
    p.add_argument("--plan-child", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.plan_child:
        plan_child(args.plan_child)
        return None
    from pipeline.plan import parse_count

    images = parse_count(args.images)
    plan = bench_plan(images, args.keep)
    print(f"plan {images:,} images: {plan['plan_seconds']} s, peak RSS {plan['peak_rss_bytes'] / 2**30:.2f} GiB "
          f"({plan['rss_after_imports_bytes'] / 2**30:.2f} GiB after imports); units {plan['stages']}")  # fmt: skip
    schedule = bench_schedule(args.units, args.num_cpus)
    print(f"schedule {schedule['units']} no-op units: {schedule['wall_seconds']} s, {schedule['ms_per_unit']} ms per unit")
    targets = {"driver_peak_rss_bytes_max": 2 * 10**9, "ms_per_unit_max": 5.0}
    return write_result("driver", {"plan": plan, "schedule": schedule, "targets": targets},
                        {"images": images, "units": args.units, "config": str(CONFIG.relative_to(ROOT)), "cpus": os.cpu_count()})  # fmt: skip


if __name__ == "__main__":
    main()
