"""megasynth from Python: the same calls the CLI makes, for scripts and notebooks.

    from pipeline import load_config, run, status, triplets

    cfg = load_config("configs/demo.yaml", ["mine.hard_negatives=2"])
    summary = run(cfg, "runs/demo-hn2", reuse=["runs/demo"])   # per-stage counts, as `megasynth run` prints
    status("runs/demo-hn2")["stages"]["write"]["output"]        # as `megasynth status --json`
    for t in triplets("runs/demo-hn2", limit=3):                 # decoded samples of the triplet shards
        t["query"], t["target"], t["instructions"], t["provenance"]

Works inside a running event loop (Jupyter): nothing here calls `asyncio.run` on the caller's thread.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path

from pipeline.config import RunConfig
from pipeline.config import load_config as _load_config


def load_config(path: str | Path | None = None, overrides: Iterable[str] = (), corpus: Iterable[str] | None = None) -> RunConfig:
    """A config file (or the defaults) with `key=value` overrides and corpus paths, validated; raises ConfigError."""
    return _load_config(path, list(overrides), list(corpus) if corpus is not None else None)


def run(config: RunConfig | str | Path, out: str | Path, *, stage: str | None = None, reuse: Iterable[str | Path] = (),
        replace: bool = False, progress: bool = True) -> dict:  # fmt: skip
    """Run the pipeline (or one stage) into `out`, resuming what is done; the per-stage summary."""
    from pipeline import runner

    cfg = config if isinstance(config, RunConfig) else load_config(config)
    return runner.run(cfg, Path(out), only=stage, progress=progress, reuse=tuple(Path(r) for r in reuse), replace=replace)


def status(run_dir: str | Path) -> dict:
    """Every stage's state and counters: what `megasynth status --json` prints."""
    from pipeline import report

    return report.status(Path(run_dir))


def triplets(run_dir: str | Path, limit: int | None = None) -> Iterator[dict]:
    """The run's triplets in shard order: `key`, `query` and `target` (PIL images), `instructions`, `provenance`."""
    import json

    import webdataset as wds
    from PIL import Image

    shards = sorted(str(p) for p in (Path(run_dir) / "triplets").glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"{run_dir}: no triplet shards (has the write stage run?)")
    samples = wds.WebDataset(shards, shardshuffle=False, empty_check=False)
    for s in itertools.islice(samples, limit):
        yield {
            "key": s["__key__"],
            "query": Image.open(io.BytesIO(s["query.jpg"])),
            "target": Image.open(io.BytesIO(s["target.jpg"])),
            "instructions": json.loads(s["instructions.json"]),
            "provenance": json.loads(s["json"]),
        }
