"""What a run did: per-stage status for `megasynth status`, the summary table, the dataset card."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from pipeline.rundir import Ledger
from stages.base import write_bytes_atomic

def status(run_dir: Path) -> dict:
    return {"stages": Ledger(Path(run_dir)).summary_chain()}


def status_table(st: dict):
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="megasynth run", show_lines=False)
    for col in ("stage", "done", "units", "input", "output", "rejected", "seconds"):
        table.add_column(col, justify="right" if col not in ("stage", "rejected") else "left")
    for name, s in st["stages"].items():
        rejected = "\n".join(escape(f"{k}: {v}") for k, v in sorted(s["rejected"].items(), key=lambda kv: -kv[1])) or "-"
        if s.get("failed") and not s["done"]:
            rejected = f"[red]failed: {escape(s['failed']['message'])}[/red]\n{rejected}"
        table.add_row(
            name, _state(s), f"{s['units']['done']}/{s['units']['total']}", str(s["input"]), str(s["output"]), rejected, f"{s['seconds']:.1f}",
        )
    return table


def _state(s: dict) -> str:
    if s["done"]:
        return f"reused from {s['source']}" if s.get("source") else "yes"
    return "stale" if s.get("stale") else ("failed" if s.get("failed") else "no")


def triplet_count(run_dir: Path) -> int:
    index = Path(run_dir) / "triplets" / "index.jsonl"
    if not index.is_file():
        return 0
    with open(index, "rb") as f:
        return sum(1 for _ in f)


def write_card(run_dir: Path) -> Path:
    """triplets/README.md: counts, models, settings and licence, from the run folder alone (no timestamps)."""
    run_dir = Path(run_dir)
    out = run_dir / "triplets"
    st = status(run_dir)["stages"]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    shards = sorted(p.name for p in out.glob("*.tar"))
    images = sorted(p.name for p in (out / "images").glob("*.tar"))
    spaces = config["embed"]["spaces"]
    ann = config["annotate"]
    lines = [
        "# megasynth triplets",
        "",
        "MegaPairs-style training triplets (query image, instruction, target image, hard negatives),",
        "synthesised by megasynth from an image-caption corpus.",
        "",
        "## Contents",
        "",
        f"- triplets: {triplet_count(run_dir)} in {len(shards)} WebDataset shard(s) (`*.tar`); each sample holds",
        "  `query.jpg`, `target.jpg`, `instructions.json` and `json` (provenance: source keys, similarity per space,",
        "  hard negatives with scores, description, models, prompt versions).",
        f"- images: every referenced image once, in {len(images)} shard(s) under `images/`.",
        "- `index.jsonl`: one row per triplet in MegaPairs' released format: `q_img`, `q_text` (a list; draw one per",
        "  training step), `t_img`, `hns` (the query image first). Paths are relative to this folder once",
        "  `images/*.tar` are extracted into `images/`.",
        "",
        "## How it was made",
        "",
        "| stage | input | output | rejected |",
        "|---|---|---|---|",
        *(f"| {n} | {s['input']} | {s['output']} | {_reasons(s['rejected'])} |" for n, s in st.items()),
        "",
        "Similarity spaces:",
        "",
        *(f"- `{name}`: {sp['kind']} space, model `{sp['model']}`" for name, sp in spaces.items()),
        "",
        f"Pairs: top-{config['mine']['k']} neighbours per space, band {config['mine']['band']} (open interval)"
        + "".join(f", {sp} {b}" for sp, b in config["mine"]["bands"].items())
        + ", "
        f"at most {config['mine']['pairs_per_query']} targets per query, {config['mine']['hard_negatives']} hard negatives.",
        "",
        f"Relation text: `{ann['describer']['model']}` with prompt `{ann['describe_prompt']}`; instructions: "
        f"`{ann['instructor']['model']}` with prompt `{ann['instruct_prompt']}`, {ann['instructions_per_pair']} per pair, "
        f"{ann['demonstrations']} demonstrations per request.",
        "",
        "The full configuration:",
        "",
        "```yaml",
        (run_dir / "config.yaml").read_text().rstrip(),
        "```",
        "",
        "## Licence",
        "",
        "Annotations (instructions, descriptions, provenance) are released under the MIT licence, as MegaPairs'",
        "were. Images keep the licence of the corpus they came from (Recap-DataComp / DataComp images are",
        "CC BY 4.0 links to third-party content); check it before redistributing.",
        "",
    ]
    path = out / "README.md"
    write_bytes_atomic(path, "\n".join(lines).encode())
    return path


def _reasons(rejected: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(rejected.items())) or "-"


def dumps(st: dict) -> str:
    return json.dumps(st, indent=1, sort_keys=False)
