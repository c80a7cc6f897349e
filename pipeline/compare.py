"""`megasynth compare RUN [RUN ...]`: runs side by side on one self-contained HTML page.

Per run: neighbour similarity by space with the band drawn on it (and the band that keeps the
same share of neighbours as a reference band, `pipeline.calibrate`), pairs per query, which
spaces found each pair, hard-negative scores by space, rejections by reason per stage,
instruction length and diversity, CPU- and GPU-seconds per stage, a few triplets with their
hard negatives, and -- where computed -- pair truth, instruction faithfulness and probe recall.

Figures are matplotlib PNGs embedded as data URLs: the page opens from disk with no server and
no network. Every statistic reads the run folder through `Ledger.source`, so a stage reused
from another run is read where it really is. Large runs are read in bounded samples (a
uniform sample by query rank or by pair id), and the page says how many it read.

The statistics are plain functions of data (`distinct_ngrams`, `repeated_share`,
`pairs_per_query`, `space_overlap`, `worker_resources`, `settings_diff`).
"""

from __future__ import annotations

import base64
import html
import io
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from pipeline import calibrate
from pipeline.rundir import STAGE_NAMES, Ledger
from stages import annotations, pairs

MAX_INSTRUCTION_PAIRS = 50_000  # annotated pairs read for instruction statistics (a uniform sample by pair id)
TRIPLETS_PER_RUN = 3
NEGATIVE_BINS = np.linspace(-1.0, 1.0, 401)  # hard-negative scores, accumulated file by file
PROBE_FILE = "probe.json"


# --- statistics: plain functions of data ----------------------------------------------------------

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def distinct_ngrams(texts: list[str], n: int) -> float | None:
    """Distinct n-grams over all n-grams of the texts (distinct-n); None when there are none."""
    grams = [tuple(w[i : i + n]) for t in texts for w in [words(t)] for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def repeated_share(texts: list[str]) -> float | None:
    """The share of texts whose exact wording (spaces and case aside) occurs more than once."""
    if not texts:
        return None
    counts = Counter(" ".join(t.lower().split()) for t in texts)
    return sum(c for c in counts.values() if c > 1) / len(texts)


def pairs_per_query(pair_counts: list[int], queries: int) -> np.ndarray:
    """How many queries got 0, 1, 2, ... pairs: `pair_counts` holds one count per query that got any."""
    counts = np.asarray(pair_counts, np.int64)
    if queries < len(counts):
        raise ValueError(f"{len(counts)} queries have pairs but only {queries} were mined")
    out = np.bincount(counts, minlength=int(counts.max(initial=0)) + 1)
    out[0] = queries - len(counts)
    return out


def space_overlap(pair: np.ndarray, space: np.ndarray, pairs: int) -> Counter:
    """How many pairs each combination of spaces found, e.g. {"caption+semantic": 12, "pattern": 3}, from
    (pair[i], space[i]): space[i] found pair[i]. Each pair's spaces become a bit mask: no Python loop over pairs."""
    known, codes = np.unique(np.asarray(space, str), return_inverse=True)
    masks = np.zeros(pairs, np.int64)
    np.bitwise_or.at(masks, np.asarray(pair, np.int64), np.left_shift(1, codes.astype(np.int64)))
    out: Counter = Counter()
    for mask, n in zip(*np.unique(masks, return_counts=True)):
        out["+".join(sp for i, sp in enumerate(known) if mask >> i & 1)] += int(n)
    return out


def worker_resources(stage: str, settings: dict) -> tuple[float, float | None]:
    """CPUs and GPUs one worker of the stage held, from its recorded settings; GPUs None when the settings
    left the device to `auto`, which the machine that ran it decided."""
    cpus = float(settings.get("cpus", 1.0))
    if settings.get("gpus") is not None:
        return cpus, float(settings["gpus"])
    if stage in ("embed", "search"):
        return cpus, _device_gpus(settings.get("device", "auto"))
    if stage == "annotate":
        needs = [_generator_gpus(settings.get(step) or {}) for step in ("describer", "instructor")]
        return cpus, None if None in needs else max(needs)
    return cpus, 0.0


def _device_gpus(device: str) -> float | None:
    return {"cuda": 1.0, "cpu": 0.0}.get(device)


def _generator_gpus(g: dict) -> float | None:
    backend = g.get("backend", "transformers")
    if backend == "transformers":
        return _device_gpus(g.get("device", "auto"))
    if backend == "vllm":
        return 1.0 if g.get("tensor_parallel_size", 1) == 1 else 0.0  # with TP > 1 vLLM places its own Ray workers
    return 0.0  # a remote server: its GPUs are not this run's


def settings_diff(configs: list[dict]) -> list[tuple[str, list[Any]]]:
    """(dotted key, value per config) for every setting that differs between the configs."""
    flat = [_flatten(c) for c in configs]
    keys = sorted(set().union(*flat))
    return [(k, [f.get(k) for f in flat]) for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict) and d:
        return {k: v for key, val in d.items() for k, v in _flatten(val, f"{prefix}{key}.").items()}
    return {prefix[:-1]: d}


# --- reading one run ---------------------------------------------------------------------------


@dataclass
class RunFacts:
    name: str
    path: Path
    config: dict
    chain: dict[str, dict]
    settings: dict[str, dict]  # per stage, as recorded
    resources: dict[str, dict] = field(default_factory=dict)  # per stage, what one worker asked Ray for, as recorded
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # neighbour similarity per space
    queries: int = 0
    calibration: dict | None = None
    per_query: np.ndarray | None = None
    overlap: Counter = field(default_factory=Counter)
    negatives: dict[str, np.ndarray] = field(default_factory=dict)  # hard-negative score histogram per space
    instructions: list[str] = field(default_factory=list)
    instruction_pairs: tuple[int, int] = (0, 0)  # annotated pairs read, of all annotated pairs kept
    triplets: list[dict] = field(default_factory=list)
    quality: dict | None = None
    probe: dict | None = None
    notes: list[str] = field(default_factory=list)  # what could not be read, said on the page


def read_run(path: Path, name: str, reference: str | None = None, band: calibrate.Band | None = None,
             triplets: int = TRIPLETS_PER_RUN) -> RunFacts:  # fmt: skip
    path = Path(path)
    if not (path / "_state").is_dir():
        raise FileNotFoundError(f"{path} is not a megasynth run folder (no _state/)")
    ledger = Ledger(path)
    chain = ledger.summary_chain()
    config = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").is_file() else {}
    settings = {s: (ledger.stage_record(s) or {}).get("settings") or {} for s in STAGE_NAMES}
    resources = {s: (ledger.stage_record(s) or {}).get("resources") or {} for s in STAGE_NAMES}
    facts = RunFacts(name, path, config, chain, settings, resources)
    if chain["search"]["done"]:
        facts.scores, facts.queries = calibrate.neighbour_scores(path)
        facts.calibration = calibrate.calibration(path, reference, band, scores=facts.scores)
    else:
        facts.notes.append("search is not done: no neighbour lists")
    if chain["mine"]["done"]:
        _read_pairs(facts, ledger.source("mine") / "pairs")
    else:
        facts.notes.append("mine is not done: no pairs")
    if chain["annotate"]["done"]:
        _read_instructions(facts, ledger.source("annotate") / "annotations")
    if chain["write"]["done"] and triplets:
        from pipeline.sample import draw_triplets

        facts.triplets = draw_triplets(path, triplets)
    facts.quality, facts.probe = _quality(path), _probe(path)
    return facts


def _read_pairs(facts: RunFacts, folder: Path) -> None:
    counts: list[int] = []
    overlap: Counter = Counter()
    negatives: dict[str, np.ndarray] = {}
    for unit in pairs.units(folder):
        t = pq.read_table(folder / f"{unit}.parquet", columns=["query_id", "spaces", "hard_negatives"])
        counts += pc.value_counts(t["query_id"]).field("counts").to_pylist()  # a query's pairs all sit in its unit's file
        space = pc.struct_field(pc.list_flatten(t["spaces"]), "space").to_numpy(zero_copy_only=False)
        overlap += space_overlap(pc.list_parent_indices(t["spaces"]).to_numpy(), space, t.num_rows)
        hn = pc.list_flatten(t["hard_negatives"])
        if len(hn):
            scores = pc.struct_field(hn, "score").to_numpy(zero_copy_only=False)
            has_space = "space" in [hn.type.field(i).name for i in range(hn.type.num_fields)]
            spaces = pc.struct_field(hn, "space").to_numpy(zero_copy_only=False) if has_space else np.full(len(scores), None)
            for sp in set(spaces.tolist()):
                key = sp or "max over spaces"  # pairs mined before the space of a hard negative was recorded
                hist = np.histogram(scores[spaces == sp], NEGATIVE_BINS)[0]
                negatives[key] = negatives.get(key, 0) + hist
    facts.per_query = pairs_per_query(counts, int(facts.chain["mine"]["input"]))
    facts.overlap, facts.negatives = overlap, negatives


def _read_instructions(facts: RunFacts, folder: Path) -> None:
    files = [folder / f"{u}.parquet" for u in annotations.units(folder)]
    total = sum(pq.read_metadata(f).num_rows for f in files)
    share = min(1.0, MAX_INSTRUCTION_PAIRS / total) if total else 1.0
    texts: list[str] = []
    read = kept = 0
    for f in files:
        t = pq.read_table(f, columns=["pair_id", "status", "instructions"])
        t = t.filter(pc.equal(t["status"], annotations.OK))
        kept += t.num_rows
        for pid, ins in zip(t["pair_id"].to_pylist(), t["instructions"].to_pylist()):
            if share >= 1 or int(pid[:12], 16) < share * 16**12:  # pair ids are hex digests: a uniform sample
                texts += ins or []
                read += 1
    facts.instructions, facts.instruction_pairs = texts, (read, kept)


def _quality(path: Path) -> dict | None:
    """pipeline.quality's summary, where that module exists and the run has what it measures."""
    try:
        from pipeline import quality
    except ImportError:
        return None
    return quality.summary(path)


def _probe(path: Path) -> dict | None:
    p = path / PROBE_FILE
    return json.loads(p.read_text()) if p.is_file() else None


# --- figures -------------------------------------------------------------------------------------


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _figure(ncols: int, nrows: int = 1, width: float = 4.2, height: float = 2.8):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = np.asarray(fig.subplots(nrows, ncols, squeeze=False))
    return fig, axes


def _colours(names: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {n: cmap(i % 10) for i, n in enumerate(names)}


def similarity_figure(runs: list[RunFacts]) -> str | None:
    spaces = sorted({sp for r in runs for sp in r.scores})
    if not spaces:
        return None
    fig, axes = _figure(len(runs), len(spaces))
    every = np.concatenate([r.scores[sp] for r in runs for sp in r.scores if len(r.scores[sp])] or [np.zeros(1)])
    lo, hi = max(-1.0, float(every.min()) - 0.02), min(1.0, float(every.max()) + 0.02)
    bins = np.linspace(lo, hi, 61)
    for j, r in enumerate(runs):
        for i, sp in enumerate(spaces):
            ax = axes[i, j]
            s = r.scores.get(sp)
            ax.set_title(f"{r.name}: {sp}", fontsize=9)
            if s is None or not len(s):
                ax.text(0.5, 0.5, "no neighbours", ha="center", va="center", transform=ax.transAxes)
                continue
            ax.hist(s, bins=bins, color="#8aa", edgecolor="none")
            c = (r.calibration or {}).get("spaces", {}).get(sp, {})
            if "run_band" in c:
                b = c["run_band"]
                ax.axvspan(b[0], b[1], color="tab:green", alpha=0.18, label=f"band ({b[0]:.3g}, {b[1]:.3g}) keeps {c['run_band_shares']['kept']:.0%}")
                t = c["transferred_band"]
                ax.axvline(t[0], color="tab:purple", ls="--", lw=1, label=f"same share as reference ({t[0]:.3g}, {t[1]:.3g})")
                ax.axvline(t[1], color="tab:purple", ls="--", lw=1)
                ax.legend(fontsize=7, loc="upper left", framealpha=0.85)
            ax.set_xlabel("cosine similarity to the query", fontsize=8)
            ax.set_ylabel("neighbours", fontsize=8)
            ax.tick_params(labelsize=7)
    return _png(fig)


def pairs_figure(runs: list[RunFacts]) -> str | None:
    have = [r for r in runs if r.per_query is not None]
    if not have:
        return None
    fig, axes = _figure(len(have))
    for ax, r in zip(axes[0], have):
        n = r.per_query
        ax.bar(np.arange(len(n)), n, color="tab:blue")
        ax.set_title(f"{r.name}: {int(n.sum())} queries, {int((np.arange(len(n)) * n).sum())} pairs", fontsize=9)
        ax.set_xlabel("pairs per query", fontsize=8)
        ax.set_ylabel("queries", fontsize=8)
        ax.set_xticks(np.arange(len(n)))
        ax.tick_params(labelsize=7)
    return _png(fig)


def overlap_figure(runs: list[RunFacts], colours: dict) -> str | None:
    have = [r for r in runs if r.overlap]
    if not have:
        return None
    combos = sorted({c for r in have for c in r.overlap}, key=lambda c: (c.count("+"), c))
    fig, axes = _figure(len(have), height=0.35 * len(combos) + 1.2)
    for ax, r in zip(axes[0], have):
        counts = [r.overlap.get(c, 0) for c in combos]
        bars = ax.barh(np.arange(len(combos)), counts, color=[colours.get(c, "tab:gray") for c in combos])
        ax.bar_label(bars, fontsize=7, padding=2)
        ax.set_yticks(np.arange(len(combos)), combos, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{r.name}: which spaces found each pair", fontsize=9)
        ax.set_xlabel("pairs", fontsize=8)
        ax.tick_params(labelsize=7)
    return _png(fig)


def negatives_figure(runs: list[RunFacts], colours: dict) -> str | None:
    have = [r for r in runs if r.negatives]
    if not have:
        return None
    fig, axes = _figure(len(have))
    nonzero = np.flatnonzero(sum(h for r in have for h in r.negatives.values()))
    lo, hi = NEGATIVE_BINS[max(0, nonzero.min() - 2)], NEGATIVE_BINS[min(len(NEGATIVE_BINS) - 1, nonzero.max() + 3)]
    for ax, r in zip(axes[0], have):
        for sp, hist in sorted(r.negatives.items()):
            ax.stairs(hist, NEGATIVE_BINS, label=f"{sp} ({int(hist.sum())})", color=colours.get(sp, "tab:gray"), lw=1.5)
        ax.set_xlim(lo, hi)
        ax.set_title(f"{r.name}: hard-negative scores", fontsize=9)
        ax.set_xlabel("similarity to the query, in the space where it scored highest", fontsize=8)
        ax.set_ylabel("hard negatives", fontsize=8)
        ax.legend(fontsize=7)
        ax.tick_params(labelsize=7)
    return _png(fig)


def instructions_figure(runs: list[RunFacts]) -> str | None:
    have = [r for r in runs if r.instructions]
    if not have:
        return None
    fig, axes = _figure(len(have))
    lengths = {r.name: np.array([len(words(t)) for t in r.instructions]) for r in have}
    top = max(int(v.max()) for v in lengths.values())
    for ax, r in zip(axes[0], have):
        ax.hist(lengths[r.name], bins=np.arange(0, top + 2) - 0.5, color="tab:orange")
        ax.set_title(f"{r.name}: words per instruction (median {np.median(lengths[r.name]):.0f})", fontsize=9)
        ax.set_xlabel("words", fontsize=8)
        ax.set_ylabel("instructions", fontsize=8)
        ax.tick_params(labelsize=7)
    return _png(fig)


def compute_seconds(r: RunFacts) -> dict[str, dict]:
    """Per stage: wall seconds summed over units, CPU- and GPU-seconds (units' seconds x the worker's resources)."""
    out = {}
    for stage, s in r.chain.items():
        recorded = r.resources.get(stage)
        cpus, gpus = (recorded["cpus"], recorded["gpus"]) if recorded else worker_resources(stage, r.settings.get(stage) or {})
        out[stage] = {"seconds": s["seconds"], "cpus": cpus, "gpus": gpus, "cpu_s": s["seconds"] * cpus,
                      "gpu_s": None if gpus is None else s["seconds"] * gpus, "reused_from": s.get("source")}  # fmt: skip
    return out


def compute_figure(runs: list[RunFacts]) -> str:
    seconds = [compute_seconds(r) for r in runs]
    kinds = [("cpu_s", "CPU-seconds")]
    if any(c[s]["gpu_s"] for c in seconds for s in STAGE_NAMES):
        kinds.append(("gpu_s", "GPU-seconds"))
    fig, axes = _figure(len(kinds), width=6.0, height=3.0)
    width = 0.8 / len(runs)
    x = np.arange(len(STAGE_NAMES))
    for k, (key, label) in enumerate(kinds):
        ax = axes[0, k]
        for j, (r, c) in enumerate(zip(runs, seconds)):
            values = [c[s][key] or 0.0 for s in STAGE_NAMES]
            bars = ax.bar(x + (j - (len(runs) - 1) / 2) * width, values, width, label=r.name)
            for b, s in zip(bars, STAGE_NAMES):
                if c[s]["reused_from"]:
                    b.set_hatch("//")
                    b.set_alpha(0.5)
        ax.set_xticks(x, STAGE_NAMES, fontsize=7)
        ax.set_title(f"{label} per stage (hatched: reused, spent by another run)", fontsize=9)
        ax.set_ylabel(label, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    return _png(fig)


# --- the page -------------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1600px; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.6em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
img.fig { max-width: 100%; height: auto; display: block; margin: 0.6em 0; }
.note { font-size: 0.85em; color: #666; max-width: 70em; }
.measured { border: 2px solid #b58900; padding: 0 1em 1em; margin-top: 2em; background: #fffdf3; }
"""


# sample.py's triplet rows, narrowed so that runs stand in columns side by side
SIDE_BY_SIDE = """
.runs { display: grid; gap: 2em; }
.runs .t { grid-template-columns: 1fr 1fr; }
.runs .t > div:nth-child(3) { grid-column: 1 / -1; }
.runs .t img.main { width: 100%; max-width: 256px; height: auto; aspect-ratio: 1; }
.runs .hn figure { width: 96px; } .runs .hn img { width: 96px; height: 96px; }
"""


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    cell = lambda v: f'<td class="n">{_fmt(v)}</td>' if isinstance(v, (int, float)) else f"<td>{html.escape(_fmt(v))}</td>"  # noqa: E731
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def _img(b64: str | None, alt: str) -> str:
    return f'<img class="fig" alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">' if b64 else '<p class="note">nothing to show</p>'


def _names(paths: list[Path]) -> list[str]:
    """Short unique labels: the folder names, with their parents where two are alike."""
    names = [p.name for p in paths]
    if len(set(names)) < len(names):
        names = [f"{p.parent.name}/{p.name}" for p in paths]
    if len(set(names)) < len(names):
        names = [f"{i + 1}: {n}" for i, n in enumerate(names)]
    return names


def compare(runs: list[Path], out: Path, reference: str | None = None, band: calibrate.Band | None = None,
            triplets: int = TRIPLETS_PER_RUN) -> Path:  # fmt: skip
    """Write the comparison page of `runs` to `out` and return its path."""
    import matplotlib

    if not runs:
        raise ValueError("compare needs at least one run folder")
    paths = [Path(r).resolve() for r in runs]
    facts = [read_run(p, n, reference, band, triplets) for p, n in zip(paths, _names(paths))]
    spaces = sorted({sp for r in facts for sp in r.scores} | {sp for r in facts for sp in r.negatives})
    colours = _colours(spaces)
    body = [f"<h1>megasynth: {len(facts)} run(s) compared</h1>", _runs_section(facts), _similarity_section(facts),
            _pairs_section(facts, colours), _rejections_section(facts), _instructions_section(facts), _compute_section(facts),
            _triplets_section(facts), _measured_section(facts)]  # fmt: skip
    page = (f'<!doctype html>\n<html><head><meta charset="utf-8"><title>megasynth compare: {html.escape(", ".join(r.name for r in facts))}'
            f'</title><style>{STYLE}</style></head><body>\n' + "\n".join(body) +
            f'\n<p class="note">Figures: matplotlib {matplotlib.__version__}.</p></body></html>\n')  # fmt: skip
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return out


def _runs_section(runs: list[RunFacts]) -> str:
    from pipeline.report import triplet_count

    rows = [[r.name, str(r.path), triplet_count(r.path), ", ".join(s for s, v in r.chain.items() if v.get("source")) or "-",
             ", ".join(s for s, v in r.chain.items() if not v["done"]) or "-"] for r in runs]  # fmt: skip
    diff = settings_diff([r.config for r in runs]) if len(runs) > 1 else []
    notes = "".join(f'<p class="note">{html.escape(r.name)}: {html.escape(n)}</p>' for r in runs for n in r.notes)
    return (
        "<h2>Runs</h2>" + _table(["run", "folder", "triplets", "stages reused", "stages not done"], rows)
        + ("<h3>Settings that differ</h3>" + _table(["setting", *(r.name for r in runs)], [[k, *v] for k, v in diff]) if diff else "")
        + notes
    )  # fmt: skip


def _similarity_section(runs: list[RunFacts]) -> str:
    rows = []
    for r in runs:
        c = r.calibration
        if not c:
            continue
        ref = c["reference"]
        for sp, v in c["spaces"].items():
            if "error" in v:
                rows.append([r.name, sp, 0, "-", "-", "-", "-", "-", "-"])
                continue
            p = v["percentiles"]
            rows.append([r.name, sp, v["neighbours"], f"{p['5']:.3f} / {p['50']:.3f} / {p['95']:.3f}", _band(v["run_band"]),
                         f"{v['run_band_shares']['below']:.1%}", f"{v['run_band_shares']['kept']:.1%}", f"{v['run_band_shares']['above']:.1%}",
                         _band(v["transferred_band"]) + (" (reference)" if sp == ref["space"] else "")])  # fmt: skip
    refs = "; ".join(f"{r.name}: {_band(r.calibration['reference']['band'])} in {r.calibration['reference']['space']}, "
                     f"{r.calibration['reference']['shares']['below']:.1%} below and {r.calibration['reference']['shares']['above']:.1%} above"
                     for r in runs if r.calibration)  # fmt: skip
    return (
        "<h2>Neighbour similarity and where the band falls</h2>"
        '<p class="note">Each query\'s top-k neighbours per space as search kept them (the query itself left out), for the '
        "queries mine used" + "".join(f"; {html.escape(r.name)}: {r.queries} queries" for r in runs if r.queries)
        + ". Shaded: the run's band (open interval); it keeps the share shown. Dashed: the band that leaves the same shares "
        f"below and above as the reference band ({html.escape(refs)}); `megasynth calibrate RUN` prints it for a config.</p>"
        + _img(similarity_figure(runs), "neighbour similarity per space")
        + _table(["run", "space", "neighbours", "p5 / p50 / p95", "run band", "below", "kept", "above", "same-share band"], rows)
    )  # fmt: skip


def _band(b) -> str:
    return f"({b[0]:.4g}, {b[1]:.4g})"


def _pairs_section(runs: list[RunFacts], colours: dict) -> str:
    return (
        "<h2>Pairs</h2>"
        '<p class="note">Pairs per query (0: a query with no neighbour in band); the spaces that found each pair in band; '
        "hard-negative scores by the space where each scored highest (its score there).</p>"
        + _img(pairs_figure(runs), "pairs per query") + _img(overlap_figure(runs, colours), "spaces that found each pair")
        + _img(negatives_figure(runs, colours), "hard-negative scores by space")
    )  # fmt: skip


def _rejections_section(runs: list[RunFacts]) -> str:
    keys = sorted({(s, reason) for r in runs for s, v in r.chain.items() for reason in v["rejected"]}, key=lambda k: (STAGE_NAMES.index(k[0]), k[1]))
    rows = [[stage, reason, *(r.chain[stage]["rejected"].get(reason, 0) for r in runs)] for stage, reason in keys]
    io_rows = [[stage, *(f"{r.chain[stage]['input']} -> {r.chain[stage]['output']}" for r in runs)] for stage in STAGE_NAMES]
    return (
        "<h2>Rejections by reason</h2>"
        '<p class="note">Items in and out of each stage (ingest: samples; embed: images; search and mine: queries, then '
        "pairs; annotate and write: pairs), then every rejection by stage and reason.</p>"
        + _table(["stage", *(r.name for r in runs)], io_rows)
        + (_table(["stage", "reason", *(r.name for r in runs)], rows) if rows else '<p class="note">No rejections.</p>')
    )  # fmt: skip


def _instructions_section(runs: list[RunFacts]) -> str:
    have = [r for r in runs if r.instructions]
    common = min((len(r.instructions) for r in have), default=0)
    rows = []
    for r in runs:
        same = random.Random(0).sample(r.instructions, common) if r.instructions else []  # equal counts: distinct-n falls as texts grow
        rows.append([r.name, f"{r.instruction_pairs[0]} of {r.instruction_pairs[1]}", len(r.instructions),
                     float(np.mean([len(words(t)) for t in r.instructions])) if r.instructions else None,
                     distinct_ngrams(same, 1), distinct_ngrams(same, 2), distinct_ngrams(same, 3), repeated_share(same)])  # fmt: skip
    return (
        "<h2>Instructions</h2>"
        '<p class="note">distinct-n: distinct word n-grams over all n-grams of the instructions (higher: more varied); '
        "repeated verbatim: the share of instructions whose exact text (case and spacing aside) occurs more than once. "
        f"Both fall as the number of texts grows, so they are measured on {common} instructions of each run (the smallest "
        f"run's count, drawn at random). Read from up to {MAX_INSTRUCTION_PAIRS:,} annotated pairs per run (a uniform "
        "sample by pair id).</p>"
        + _img(instructions_figure(runs), "words per instruction")
        + _table(["run", "pairs read", "instructions", "mean words", "distinct-1", "distinct-2", "distinct-3", "repeated verbatim"], rows)
    )  # fmt: skip


def _compute_section(runs: list[RunFacts]) -> str:
    rows = []
    for r in runs:
        for stage, c in compute_seconds(r).items():
            rows.append([r.name, stage, c["seconds"], c["cpus"], "?" if c["gpus"] is None else c["gpus"], c["cpu_s"],
                         "?" if c["gpu_s"] is None else c["gpu_s"], c["reused_from"] or "-"])  # fmt: skip
    return (
        "<h2>Compute per stage</h2>"
        '<p class="note">From the run\'s own ledger: seconds are the stage\'s units\' durations summed (work, not wall time); '
        "CPU-seconds and GPU-seconds are those seconds times the CPUs and GPUs one worker of the stage holds, as its recorded "
        "settings ask (`cpus`, `gpus`, else one GPU where the device is cuda). \"?\": the device was `auto`, decided on the "
        "machine that ran it. A reused stage's seconds were spent by the run it is reused from. GPU-seconds are drawn "
        "when some stage has any.</p>"
        + _img(compute_figure(runs), "CPU- and GPU-seconds per stage")
        + _table(["run", "stage", "seconds", "CPUs / worker", "GPUs / worker", "CPU-seconds", "GPU-seconds", "reused from"], rows)
    )  # fmt: skip


def _triplets_section(runs: list[RunFacts]) -> str:
    from pipeline.sample import STYLE as SAMPLE_STYLE
    from pipeline.sample import triplet_html

    parts = []
    for r in runs:
        rows = "".join(triplet_html(t) for t in r.triplets) or '<p class="note">No triplets written.</p>'
        parts.append(f"<div><h3>{html.escape(r.name)}</h3>{rows}</div>")
    columns = f".runs {{ grid-template-columns: repeat({len(runs)}, minmax(0, 1fr)); }}"
    return (f"<style>{SAMPLE_STYLE}{SIDE_BY_SIDE}{columns}</style><h2>Triplets</h2><p class=\"note\">Random triplets of each run "
            "(seed 0): query and target, the instructions, then the hard negatives, hardest first, each with its similarity "
            "to the query and the space it comes from.</p>"
            f'<div class="runs">{"".join(parts)}</div>')  # fmt: skip


def _measured_section(runs: list[RunFacts]) -> str:
    quality = [_flatten(r.quality) if r.quality else {} for r in runs]
    probe = [_flatten({k: v for k, v in r.probe.items() if k not in ("run", "settings")}) if r.probe else {} for r in runs]
    parts = ['<section class="measured"><h2>Measured quality</h2>',
             '<p class="note">Computed by other tools where they have run: pair truth and instruction faithfulness from '
             "<code>pipeline.quality</code> (only on a corpus whose catalog carries the synthetic generator's attributes), "
             "retrieval recall from <code>megasynth probe</code> (<code>RUN/probe.json</code>). \"-\": not measured for that run.</p>"]  # fmt: skip
    for title, rows in (("Pair truth and instruction faithfulness (pipeline.quality)", quality), ("Probe (RUN/probe.json)", probe)):
        keys = sorted(set().union(*rows))
        if keys:
            parts.append(f"<h3>{title}</h3>" + _table(["measure", *(r.name for r in runs)], [[k, *(row.get(k) for row in rows)] for k in keys]))
        else:
            parts.append(f'<h3>{title}</h3><p class="note">Not measured for any of these runs.</p>')
    parts.append("</section>")
    return "".join(parts)
