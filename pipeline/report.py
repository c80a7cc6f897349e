"""What a run did: per-stage status for `megasynth status`, the summary table, the dataset card."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import yaml

from pipeline.rundir import Ledger
from stages.base import write_bytes_atomic
from stages.write import SAMPLE_MEMBERS

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
    if line := selected_line(st["stages"].get("select", {})):
        table.caption = escape(line)
    return table


def selected_line(summary: dict) -> str | None:
    """`megasynth status`'s line on what each select query chose, or None when select ran without queries."""
    counts = {k.removeprefix("selected."): n for k, n in summary.get("counters", {}).items() if k.startswith("selected.")}
    if not counts:
        return None
    return f"select: {summary['output']} images selected; by query: " + ", ".join(f"{k} {n}" for k, n in counts.items())


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
    """triplets/README.md: Hub front matter, counts, models, settings and licence, from the run folder and the
    text models' folders (no timestamps)."""
    run_dir = Path(run_dir)
    out = run_dir / "triplets"
    st = status(run_dir)["stages"]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    shards = sorted(p.name for p in out.glob("*.tar"))
    images = sorted(p.name for p in (out / "images").glob("*.tar"))
    spaces = config["embed"]["spaces"]
    ann = config["annotate"]
    write = config["write"]
    cap = config.get("caption") or {}
    writers = text_writers(run_dir)
    toys = [f"{role} `{m}`" for role, m in writers.items() if is_toy_model(m)]
    lines = [
        "---",
        yaml.safe_dump(card_metadata(write, triplet_count(run_dir), sum(p.stat().st_size for p in out.glob("triplets-*.tar"))),
                       sort_keys=False, allow_unicode=True).rstrip(),  # fmt: skip
        "---",
        "",
        "# megasynth triplets",
        "",
        "MegaPairs-style training triplets (query image, instruction, target image, hard negatives),",
        "synthesised by megasynth from an image-caption corpus.",
        "",
        *(
            [f"> **Text from toy models.** {toy_sentence(toys)} (A toy model's folder holds `{TOY_MODEL_MARKER}` with",
             "> `toy_model: true`.)", ""]
            if toys else []
        ),  # fmt: skip
        "## Contents",
        "",
        f"- triplets: {triplet_count(run_dir)} in {len(shards)} WebDataset shard(s) (`triplets-*.tar`); each sample holds",
        "  `query.jpg`, `target.jpg`, `instructions.json` and `json` (provenance: source shard, key, url and kept fields",
        "  (`query_meta`/`target_meta`, JSON text) of both images, similarity per space, hard negatives with scores,",
        "  description, models, prompt versions). The types are the same in every sample and declared above, so",
        "  `datasets.load_dataset(\"<this folder>\")` or `load_dataset(\"webdataset\", data_files=\"triplets-*.tar\")` reads them.",
        f"- images: every referenced image once, in {len(images)} shard(s) under `images/`.",
        "- `index.jsonl`: one row per triplet in MegaPairs' released format: `q_img`, `q_text` (a list; draw one per",
        "  training step), `t_img`, `hns` (the query image first), then `q_url`, `q_meta`, `t_url`, `t_meta` (the",
        "  corpus's url and kept fields of query and target). Paths are relative to this folder once `images/*.tar` are",
        "  extracted into `images/`.",
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
        caption_rule(cap, st.get("caption", {})),
        "",
        f"Pairs: top-{config['mine']['k']} neighbours per space, band {config['mine']['band']} (open interval)"
        + "".join(f", {sp} {b}" for sp, b in config["mine"]["bands"].items())
        + ", "
        f"at most {config['mine']['pairs_per_query']} targets per query, {config['mine']['hard_negatives']} hard negatives.",
        "",
        f"Relation text: `{ann['describer']['model']}` with prompt `{_prompt_name(ann['describe_prompt'])}`"
        f"{' (a text LLM shown the two captions, no image: `describer.kind: text`)' if ann['describer'].get('kind') == 'text' else ''}; instructions: "
        f"`{ann['instructor']['model']}` with prompt `{_prompt_name(ann['instruct_prompt'])}`, {ann['instructions_per_pair']} per pair, "
        f"{ann['demonstrations']} demonstrations per request.",
        "",
        "The models that wrote the text:",
        "",
        "| role | model | licence |",
        "|---|---|---|",
        *(f"| {role} | `{m}`{' (toy model)' if is_toy_model(m) else ''} | {model_license(m, write['model_licenses']) or 'not stated'} |"
          for role, m in writers.items()),  # fmt: skip
        "",
        "The full configuration:",
        "",
        "```yaml",
        (run_dir / "config.yaml").read_text().rstrip(),
        "```",
        "",
        "## Licence",
        "",
        f"Annotations (instructions, descriptions, provenance): `{write['license']}` (`write.license`; MegaPairs' were MIT).",
        f"Images, urls and captions keep the terms of the corpus they came from: `{write['source_license']}`",
        "(`write.source_license`, as the corpus's publisher states it; the images themselves stay their owners').",
        "Check both, and the text models' licences above, before redistributing.",
        "",
    ]
    path = out / "README.md"
    write_bytes_atomic(path, "\n".join(lines).encode())
    return path


def card_metadata(write: dict, triplets: int, shard_bytes: int) -> dict:
    """The card's YAML front matter: licences, the triplet shards as the only data files, every sample's typed fields.
    A loader checks the row count; the split's bytes are the shards' (the Hub wants a number; they are close)."""
    return {
        "license": write["license"],
        "source_license": write["source_license"],
        "pretty_name": "megasynth triplets",
        "tags": ["megasynth", "multimodal-retrieval", "synthetic", "webdataset"],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "triplets-*.tar"}]}],
        "dataset_info": {
            "features": sample_features(),
            "splits": [{"name": "train", "num_bytes": shard_bytes, "num_examples": triplets}],
            "download_size": shard_bytes,
        },
    }


def sample_features() -> list[dict]:
    """A triplet sample's fields in the Hub's YAML form, in the order the `webdataset` loader yields them."""
    members = [{"name": name, "dtype": "image"} if name.endswith(".jpg") else {"name": name, **_feature(t)} for name, t in SAMPLE_MEMBERS.items()]
    return [*members, {"name": "__key__", "dtype": "string"}, {"name": "__url__", "dtype": "string"}]


_DTYPES = {pa.string(): "string", pa.int64(): "int64", pa.float64(): "float64", pa.bool_(): "bool"}


def _feature(t: pa.DataType) -> dict:
    if pa.types.is_struct(t):
        return {"struct": [{"name": f.name, **_feature(f.type)} for f in t]}
    if pa.types.is_list(t):
        inner = _feature(t.value_type)
        return {"list": inner.get("dtype", inner.get("struct", inner))}
    return {"dtype": _DTYPES[t]}


TOY_MODEL_MARKER = "demo_training.json"  # demo/toy_models.py writes it into each toy model's folder, with "toy_model": true


def text_writers(run_dir: Path) -> dict[str, str]:
    """role -> model, for each model that wrote a run's text: the captioner (when it wrote captions), the describer and
    the instructor, as the run's config.yaml names them."""
    config = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    ann, cap = config["annotate"], config.get("caption") or {}
    generated = status(run_dir)["stages"].get("caption", {}).get("counters", {}).get("from.generated", 0)
    return {**({"captioner": cap["captioner"]["model"]} if generated and cap.get("captioner") else {}),
            **{role: ann[role]["model"] for role in ("describer", "instructor")}}  # fmt: skip


def toy_sentence(toys: list[str]) -> str:
    """What the card and the sample page say of the toy models (role and name, as each formats them) among a run's writers."""
    one = len(toys) == 1
    return (f"The {' and the '.join(toys)} {'is a tiny demo model' if one else 'are tiny demo models'} trained for minutes "
            f"on the demo corpus's captions: the text {'it' if one else 'they'} wrote shows the pipeline's output format, "
            "not text to train a retrieval model on.")  # fmt: skip


def is_toy_model(model: str) -> bool:
    """Whether `model` is a local folder holding one of the demo's toy models."""
    try:
        marker = json.loads((Path(model) / TOY_MODEL_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("toy_model") is True


def model_license(model: str, configured: dict[str, str]) -> str | None:
    """A text model's licence: `write.model_licenses`, else the `license` its folder's model card declares; None if neither."""
    for name, licence in configured.items():  # a local folder may be named relative to where the run started
        if name == model or Path(name).resolve() == Path(model):
            return licence
    try:
        text = (Path(model) / "README.md").read_text()
        front = yaml.safe_load(text.split("---", 2)[1]) if text.startswith("---") else None
    except (OSError, ValueError, IndexError, yaml.YAMLError):
        return None
    if not isinstance(front, dict) or not front.get("license"):
        return None
    return str(front.get("license_name") or front["license"]) if front["license"] == "other" else str(front["license"])


def _reasons(rejected: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(rejected.items())) or "-"


def dumps(st: dict) -> str:
    return json.dumps(st, indent=1, sort_keys=False)


def caption_rule(cap: dict, summary: dict) -> str:
    """The card's sentence on which caption each image is known by (the caption stage's rule) and how many were generated."""
    counters = summary.get("counters", {})
    fields = " else ".join(f"`{f}`" for f in cap.get("use", []))
    made = f"generated by `{cap['captioner']['model']}` with prompt `{_prompt_name(cap['prompt'])}`" if cap.get("captioner") else ""
    if cap.get("mode") == "all":
        rule = f"every image's caption was {made} (`caption.mode: all`), the corpus's own kept in the catalog"
    elif cap.get("mode") == "missing" and made:
        rule = f"each image's caption is its corpus's {fields} (`caption.use`), else one {made} (`caption.mode: missing`)"
    else:
        rule = f"each image's caption is its corpus's {fields} (`caption.use`); none were generated (`caption.mode: {cap.get('mode')}`)"
    tally = ", ".join(f"{n} from `{k.removeprefix('from.')}`" for k, n in sorted(counters.items()) if k.startswith("from."))
    none = counters.get("uncaptioned", 0) + sum(summary.get("rejected", {}).values())
    return (f"Captions: {rule}. The text spaces and the describer read these same captions, and each sample's "
            f"`query_caption`/`target_caption` says where its came from. Images: {tally or 'none captioned'}; {none} without a caption.")


def _prompt_name(setting: str) -> str:
    """A packaged prompt's name, or a prompt file's name and digest (as the triplets' provenance has it), never a local path."""
    from stages.annotation.prompts import load_prompt

    try:
        return load_prompt(setting).name
    except (OSError, ValueError):  # the file moved since the run: its name still says which it was
        return Path(setting).name
