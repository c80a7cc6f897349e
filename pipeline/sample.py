"""`megasynth sample`: random triplets of a run as one HTML page, for a person to judge."""

from __future__ import annotations

import base64
import html
import json
import random
from pathlib import Path

import webdataset as wds

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>megasynth sample: {title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1100px; color: #222; }}
.t {{ border-top: 1px solid #ccc; padding: 1.2em 0; display: grid; grid-template-columns: 260px 260px 1fr; gap: 1em; }}
.t img {{ width: 256px; height: 256px; object-fit: contain; background: #f4f4f4; }}
.cap {{ font-size: 0.8em; color: #666; }}
ol {{ margin: 0.4em 0; padding-left: 1.4em; }} li {{ margin: 0.2em 0; }}
.d {{ font-size: 0.9em; color: #444; }} .meta {{ font-size: 0.75em; color: #888; }}
</style></head><body>
<h1>{count} random triplets of {title}</h1>
<p class="meta">Seed {seed}. Query left, target right; the instructions should lead from the query to the target.</p>
{rows}
</body></html>
"""

ROW = """<div class="t">
<div><img src="data:image/jpeg;base64,{q}"><div class="cap">query {qk}</div></div>
<div><img src="data:image/jpeg;base64,{t}"><div class="cap">target {tk}</div></div>
<div><b>Instructions</b><ol>{instructions}</ol>
<p class="d"><b>Description</b> ({word_num} words asked): {description}</p>
<p class="meta">spaces: {spaces}<br>hard negatives: {negatives}<br>models: {models}; prompts: {prompts}</p></div>
</div>"""


def sample_page(run_dir: Path, n: int = 20, seed: int = 0, out: Path | None = None) -> Path:
    shards = sorted(str(p) for p in (Path(run_dir) / "triplets").glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"no triplet shards under {Path(run_dir) / 'triplets'}: has the write stage run?")
    rows = [_row(s) for s in _reservoir(wds.WebDataset(shards, shardshuffle=False), n, random.Random(seed))]
    out = Path(out) if out else Path(run_dir) / "sample.html"
    out.write_text(PAGE.format(title=html.escape(str(run_dir)), count=len(rows), seed=seed, rows="\n".join(rows)))
    return out


def _reservoir(samples, n: int, rng: random.Random) -> list:
    """n samples drawn uniformly in one pass, holding only n in memory (Algorithm R)."""
    chosen: list = []
    for i, sample in enumerate(samples):
        if i < n:
            chosen.append(sample)
        elif (j := rng.randrange(i + 1)) < n:
            chosen[j] = sample
    return chosen


def _row(s: dict) -> str:
    meta = json.loads(s["json"])
    esc = html.escape
    return ROW.format(
        q=base64.b64encode(s["query.jpg"]).decode(),
        t=base64.b64encode(s["target.jpg"]).decode(),
        qk=esc(meta["query_key"]),
        tk=esc(meta["target_key"]),
        instructions="".join(f"<li>{esc(i)}</li>" for i in json.loads(s["instructions.json"])),
        description=esc(meta["description"] or ""),
        word_num=meta.get("word_num"),
        spaces=esc(", ".join(f"{k} {v:.3f}" for k, v in meta["spaces"].items())),
        negatives=esc(", ".join(f"{h['key']} ({h['score']:.3f})" for h in meta["hard_negatives"]) or "none"),
        models=esc(", ".join(f"{k}: {v}" for k, v in meta["models"].items() if k != "spaces")),
        prompts=esc(", ".join(meta["prompt_version"].values())),
    )
