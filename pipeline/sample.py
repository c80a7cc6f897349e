"""`megasynth sample`: random triplets of a run as one HTML page, for a person to judge.

Each triplet shows the query and target images, the instructions and the description, and its
hard negatives as thumbnails, each with its score and the space that score comes from. The
thumbnails are also what `megasynth compare` shows per run (`draw_triplets`, `triplet_html`).
"""

from __future__ import annotations

import base64
import html
import io
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

from pipeline.report import is_toy_model, text_writers, toy_sentence
from pipeline.rundir import Ledger
from stages import annotations, catalog
from stages.images import open_image

MAIN_SIDE = 256  # query and target, as shown
NEGATIVE_SIDE = 128  # hard negatives, as shown

STYLE = """
.t { border-top: 1px solid #ccc; padding: 1.2em 0; display: grid; grid-template-columns: 260px 260px 1fr; gap: 1em; }
.t img.main { width: 256px; height: 256px; object-fit: contain; background: #f4f4f4; }
.hn { grid-column: 1 / -1; display: flex; flex-wrap: wrap; gap: 0.8em; }
.hn figure { margin: 0; width: 128px; } .hn img { width: 128px; height: 128px; object-fit: contain; background: #f4f4f4; }
.cap, figcaption { font-size: 0.8em; color: #666; overflow-wrap: anywhere; }
.t ol { margin: 0.4em 0; padding-left: 1.4em; } .t li { margin: 0.2em 0; }
.toy { background: #fff4d6; border-left: 4px solid #e0a800; padding: 0.6em 1em; }
.d { font-size: 0.9em; color: #444; } .meta { font-size: 0.75em; color: #888; }
"""

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>megasynth sample: {title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1100px; color: #222; }}
{style}
</style></head><body>
<h1>{count} random triplets of {title}</h1>
{notice}<p class="meta">Seed {seed}. Query left, target right; the instructions should lead from the query to the target.
Below them the hard negatives, hardest first, each with its similarity to the query in the space where it scored highest.</p>
{rows}
</body></html>
"""

ROW = """<div class="t">
<div><img class="main" src="data:image/jpeg;base64,{q}" alt="query"><div class="cap">query {qk}</div></div>
<div><img class="main" src="data:image/jpeg;base64,{t}" alt="target"><div class="cap">target {tk}</div></div>
<div><b>Instructions</b><ol>{instructions}</ol>
<p class="d"><b>Description</b> ({word_num} words asked): {description}</p>
<p class="meta">paired by: {spaces}<br>models: {models}; prompts: {prompts}</p></div>
<div class="hn">{negatives}</div>
</div>"""

NEGATIVE = """<figure><img src="data:image/jpeg;base64,{img}" alt="hard negative"><figcaption>{key}<br>{score}</figcaption></figure>"""
MISSING = """<figure><div class="cap">{key}<br>{score}<br>(image not readable: {why})</div></figure>"""


def sample_page(run_dir: Path, n: int = 20, seed: int = 0, out: Path | None = None) -> Path:
    rows = [triplet_html(t) for t in draw_triplets(run_dir, n, seed)]
    out = Path(out) if out else Path(run_dir) / "sample.html"
    out.write_text(PAGE.format(title=html.escape(str(run_dir)), count=len(rows), seed=seed, style=STYLE, rows="\n".join(rows),
                               notice=toy_notice(run_dir)))  # fmt: skip
    return out


def toy_notice(run_dir: Path) -> str:
    """A warning paragraph when one of the models that wrote the run's text is a demo toy model; "" otherwise."""
    toys = [f"{role} <code>{html.escape(m)}</code>" for role, m in text_writers(run_dir).items() if is_toy_model(m)]
    if not toys:
        return ""
    return f'<p class="toy"><b>Text from toy models.</b> {toy_sentence(toys)}</p>\n'


def draw_triplets(run_dir: Path, n: int, seed: int = 0) -> list[dict]:
    """n triplets drawn at random, each with its hard negatives' thumbnails and spaces.

    Triplet shards hold about the same number of samples, so n shards are drawn, then n of their
    samples: a sample reads n shards, not the whole dataset (all of them when there are fewer).

    A triplet: `query`/`target` (JPEG bytes), `instructions`, `meta` (the sample's provenance) and
    `negatives`: [{key, score, space, jpeg or None, why}], hardest first, as written."""
    run_dir = Path(run_dir)
    shards = sorted(str(p) for p in (run_dir / "triplets").glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"no triplet shards under {run_dir / 'triplets'}: has the write stage run?")
    rng = random.Random(seed)
    read = sorted(rng.sample(shards, min(n, len(shards))))
    chosen = _reservoir(wds.WebDataset(read, shardshuffle=False), n, rng)
    metas = [json.loads(s["json"]) for s in chosen]
    spaces = _negative_spaces(run_dir, {m["pair_id"] for m in metas})
    ids = {_image_id(h) for m in metas for h in m["hard_negatives"]}
    images = _thumbnails(Ledger(run_dir).source("ingest") / "catalog", ids)
    out = []
    for s, m in zip(chosen, metas):
        negatives = []
        for h in m["hard_negatives"]:
            i = _image_id(h)
            jpeg, why = images.get(i, (None, "not in the catalog"))
            negatives.append({"key": h["key"], "score": h["score"], "space": spaces.get(m["pair_id"], {}).get(i), "jpeg": jpeg, "why": why})
        out.append({"query": s["query.jpg"], "target": s["target.jpg"], "instructions": json.loads(s["instructions.json"]),
                    "meta": m, "negatives": negatives})  # fmt: skip
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


def _image_id(negative: dict) -> str:
    return f"{negative['shard']}/{negative['key']}"  # the catalog's id ("{shard}/{key}")


def _negative_spaces(run_dir: Path, pair_ids: set[str]) -> dict[str, dict[str, str | None]]:
    """pair id -> hard negative id -> the space of its score, from the annotations the triplets were written from."""
    folder = Ledger(run_dir).source("annotate") / "annotations"
    wanted = pa.array(sorted(pair_ids), pa.string())
    out: dict[str, dict[str, str | None]] = {}
    for unit in annotations.units(folder):
        t = pq.read_table(folder / f"{unit}.parquet", columns=["pair_id", "hard_negatives"])
        for r in t.filter(pc.is_in(t["pair_id"], value_set=wanted)).to_pylist():
            out[r["pair_id"]] = {h["id"]: h.get("space") for h in r["hard_negatives"]}  # pairs mined before spaces were recorded: None
    return out


def _thumbnails(catalog_dir: Path, ids: set[str]) -> dict[str, tuple[bytes | None, str | None]]:
    """id -> (a JPEG thumbnail, None) or (None, why not), read from the corpus through the catalog."""
    rows = catalog.lookup(catalog_dir, ids, ["path", "offset", "size"]) if ids else {}
    out = {}
    for i, row in rows.items():
        try:
            data = catalog.read_image_bytes(catalog.ImageRef(i, row["path"], row["offset"], row["size"]))
            out[i] = (thumbnail(data, NEGATIVE_SIDE), None)
        except OSError as e:  # a moved or damaged corpus: the page says so where the image would be
            out[i] = (None, f"{type(e).__name__}: {e}")
    return out


def thumbnail(data: bytes, side: int) -> bytes:
    img = open_image(data)
    img.thumbnail((side, side), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def negative_label(score: float, space: str | None) -> str:
    return f"{space} {score:.3f}" if space else f"{score:.3f} (max over spaces)"


def _space_scores(spaces: list | dict) -> list[tuple[str, float]]:
    """The provenance's spaces: [{space, score}] (write v5), or {space: score} as earlier runs wrote them."""
    return list(spaces.items()) if isinstance(spaces, dict) else [(s["space"], s["score"]) for s in spaces]


def triplet_html(t: dict, main_side: int = MAIN_SIDE) -> str:
    meta, esc = t["meta"], html.escape
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    negatives = [
        NEGATIVE.format(img=b64(h["jpeg"]), key=esc(h["key"]), score=esc(negative_label(h["score"], h["space"])))
        if h["jpeg"] else MISSING.format(key=esc(h["key"]), score=esc(negative_label(h["score"], h["space"])), why=esc(h["why"] or "?"))
        for h in t["negatives"]
    ]  # fmt: skip
    return ROW.format(
        q=b64(thumbnail(t["query"], main_side)),
        t=b64(thumbnail(t["target"], main_side)),
        qk=esc(meta["query_key"]),
        tk=esc(meta["target_key"]),
        instructions="".join(f"<li>{esc(i)}</li>" for i in t["instructions"]),
        description=esc(meta["description"] or ""),
        word_num=meta.get("word_num"),
        spaces=esc(", ".join(f"{k} {v:.3f}" for k, v in _space_scores(meta["spaces"]))),
        models=esc(", ".join(f"{k}: {v}" for k, v in meta["models"].items() if k != "spaces")),
        prompts=esc(", ".join(meta["prompt_version"].values())),
        negatives="".join(negatives) or '<span class="meta">no hard negatives</span>',
    )
