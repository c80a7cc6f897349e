"""`megasynth calibrate`: where a similarity band falls in each space, and the band that keeps the same share.

The paper's band (0.80, 0.96) was set on EVA-CLIP's image tower; other encoders spread their
cosine similarities differently, so the same numbers keep a different share of neighbours in
each space. Expressed as shares of a space's neighbour scores -- the share at or below the
band and the share at or above it -- a band transfers: in every other space, the band with
the same shares below and above keeps the same share of neighbours.

The policy is plain functions of score arrays (`percentiles`, `shares`, `transfer`); the rest
reads the scores mine chooses from: each query's top-k neighbours per space in `neighbours/`,
the query itself left out, for the queries mine uses (a uniform sample by query rank when
there are more than `max_queries`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.rundir import Ledger
from stages import neighbours
from stages.mine import MineSettings, MineStage

Band = tuple[float, float]
PERCENTILES = (1, 5, 10, 25, 50, 75, 90, 95, 99)
MAX_QUERIES = 200_000  # enough for percentiles to 1e-3; bounds memory at any corpus size


# --- the policy: plain functions of score arrays ----------------------------------------------------


@dataclass(frozen=True)
class Shares:
    below: float  # score <= lo: unrelated
    kept: float  # lo < score < hi: candidate targets (the band is an open interval, as in mine)
    above: float  # score >= hi: near-duplicates


def percentiles(scores: np.ndarray, qs: tuple[float, ...] = PERCENTILES) -> dict[float, float]:
    if len(scores) == 0:
        raise ValueError("no neighbour scores: nothing to take percentiles of")
    return {q: float(v) for q, v in zip(qs, np.percentile(np.asarray(scores, np.float64), qs))}


def shares(scores: np.ndarray, band: Band) -> Shares:
    """What share of the scores a band leaves below, keeps, and leaves above."""
    s = np.asarray(scores, np.float64)
    if len(s) == 0:
        raise ValueError("no neighbour scores: no share to measure")
    lo, hi = band
    below, above = float(np.mean(s <= lo)), float(np.mean(s >= hi))
    return Shares(below, 1.0 - below - above, above)


def transfer(reference: Shares, scores: np.ndarray, prefer: Band | None = None) -> Band:
    """The band that leaves the same shares below and above in `scores` as the reference band did in its space.

    Each edge separates round(share * n) of the scores from the rest, or as near to that as ties allow.
    Any value between the two scores an edge separates keeps the same neighbours: `prefer`'s edge
    (the reference band itself) where it is such a value, else the shortest decimal that is. An
    empty share puts the edge at the end of the scale (-1 or 1)."""
    s = np.asarray(scores, np.float64)
    n = len(s)
    if n == 0:
        raise ValueError("no neighbour scores: no band to transfer")
    lo = _edge(s, round(reference.below * n), prefer[0] if prefer else None)
    hi = -_edge(-s, round(reference.above * n), -prefer[1] if prefer else None)  # at or above hi = at or below -hi
    if not lo < hi:
        raise ValueError(f"the reference band keeps {reference.kept:.1%} of neighbours: too few to place a band among {n} scores")
    return lo, hi


def _edge(s: np.ndarray, count: int, prefer: float | None) -> float:
    """An edge with `count` of the scores at or below it (the nearest count that ties allow)."""
    values, counts = np.unique(s, return_counts=True)
    at_or_below = np.concatenate([[0], np.cumsum(counts)])  # option j: the edge between values[j - 1] and values[j]
    j = int(np.argmin(np.abs(at_or_below - count)))
    low, high = (float(values[j - 1]) if j else -1.0), (float(values[j]) if j < len(values) else 1.0)
    if prefer is not None and low <= prefer < high:
        return float(prefer)
    if j == 0:
        return -1.0
    if j == len(values):
        return low
    return _between(low, high)


def _between(a: float, b: float) -> float:
    """The shortest decimal strictly between a < b, so a config stays readable."""
    for decimals in range(2, 17):
        if a < (v := round((a + b) / 2, decimals)) < b:
            return v
    return (a + b) / 2


# --- reading a run ------------------------------------------------------------------------------------


def check_run(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    if not (run_dir / "_state").is_dir():
        raise FileNotFoundError(f"{run_dir} is not a megasynth run folder (no _state/)")
    return run_dir


def mine_settings(run_dir: Path) -> MineSettings:
    """The settings mine ran with (or, before mine ran, those in the run's config)."""
    rec = Ledger(Path(run_dir)).stage_record("mine")
    if rec and rec.get("settings"):
        return MineSettings.model_validate(rec["settings"])
    from pipeline.config import load_config

    return load_config(Path(run_dir) / "config.yaml").stage_settings("mine")


def neighbour_scores(run_dir: Path, max_queries: int = MAX_QUERIES) -> tuple[dict[str, np.ndarray], int]:
    """Every mined space's neighbour scores (the query itself left out) and how many queries they come from."""
    run_dir = check_run(run_dir)
    ledger = Ledger(run_dir)
    if not ledger.summary_chain()["search"]["done"]:
        raise ValueError(f"{run_dir}: the search stage is not done, so there are no neighbour lists to read")
    settings = mine_settings(run_dir)
    folder = ledger.source("search") / "neighbours"
    inputs = {"catalog": ledger.source("ingest") / "catalog", "neighbours": folder, "selection": ledger.source("select") / "selection"}
    stage = MineStage(settings, inputs, run_dir / "pairs")  # the queries mine would draw, counted among the selected images
    spaces = stage.mined_spaces()
    units = stage.plan()[0]
    threshold = units[0].payload["threshold"] if units else neighbours.FULL
    files = [folder / f"{u.id}.parquet" for u in units]
    ranks = [_ranks(f) for f in files]
    queries = sum(int(_below(r, threshold).sum()) for r in ranks)
    if queries > max_queries:  # query ranks are uniform hashes: a lower threshold is a uniform sample
        threshold = int(threshold * max_queries / queries)
    found: dict[str, list[np.ndarray]] = {sp: [] for sp in spaces}
    used = 0
    for f, r in zip(files, ranks):
        keep = np.flatnonzero(_below(r, threshold))
        if len(keep) == 0:
            continue
        used += len(keep)
        table, hits = neighbours.read(f, spaces, settings.k + 1)
        query = table["query_ordinal"].to_numpy()[keep][:, None]
        for sp in spaces:
            ordinals, _, scores = (a[keep] for a in hits[sp])
            found[sp].append(scores[(ordinals >= 0) & (ordinals != query)])
    return {sp: np.concatenate(parts) if parts else np.zeros(0, np.float32) for sp, parts in found.items()}, used


def _ranks(path: Path) -> np.ndarray:
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=["query_rank"])["query_rank"].to_numpy()


def _below(ranks: np.ndarray, threshold: int) -> np.ndarray:
    return np.ones(len(ranks), bool) if threshold >= neighbours.FULL else ranks < np.uint64(threshold)


def calibration(run_dir: Path, reference: str | None = None, band: Band | None = None, max_queries: int = MAX_QUERIES,
                scores: dict[str, np.ndarray] | None = None) -> dict:  # fmt: skip
    """Per space: percentiles, the run's band and the shares it keeps, and the reference band transferred.

    `reference` is the space the reference band was set in (default: `semantic` if mined, else the
    first space); `band` the reference band (default: the run's band in that space)."""
    settings = mine_settings(check_run(run_dir))
    queries = None
    if scores is None:
        scores, queries = neighbour_scores(run_dir, max_queries)
    spaces = sorted(scores)
    reference = reference or ("semantic" if "semantic" in spaces else spaces[0])
    if reference not in scores:
        raise ValueError(f"--reference {reference}: not a mined space of {run_dir} (mined: {', '.join(spaces)})")
    ref_band = tuple(band) if band is not None else settings.band_of(reference)
    if not -1.0 <= ref_band[0] < ref_band[1] <= 1.0:
        raise ValueError(f"a band is LO HI with -1 <= LO < HI <= 1 (got {list(ref_band)})")
    ref_shares = shares(scores[reference], ref_band)
    out = {"run": str(run_dir), "queries": queries, "reference": {"space": reference, "band": list(ref_band), "shares": vars(ref_shares)}, "spaces": {}}
    for sp in spaces:
        s = scores[sp]
        if len(s) == 0:
            out["spaces"][sp] = {"neighbours": 0, "error": "no neighbour scores in this space"}
            continue
        run_band = settings.band_of(sp)
        moved = transfer(ref_shares, s, prefer=ref_band)
        out["spaces"][sp] = {
            "neighbours": int(len(s)),
            "percentiles": {str(q): round(v, 6) for q, v in percentiles(s).items()},
            "run_band": list(run_band),
            "run_band_shares": vars(shares(s, run_band)),
            "transferred_band": list(moved),
            "transferred_band_shares": vars(shares(s, moved)),
        }
    return out


def calibration_table(cal: dict):
    """One column per space, so three spaces fit a terminal."""
    from rich.table import Table

    ref = cal["reference"]
    rs = ref["shares"]
    spaces = list(cal["spaces"])
    table = Table(title=f"neighbour similarity by space ({cal['queries']} queries)", caption=(
        f"reference band {_band(ref['band'])} in {ref['space']}: {rs['below']:.1%} below, {rs['kept']:.1%} kept, {rs['above']:.1%} above"))  # fmt: skip
    table.add_column("")
    for sp in spaces:
        table.add_column(sp, justify="right")
    ok = {sp: c for sp, c in cal["spaces"].items() if "error" not in c}

    def row(label: str, value) -> None:
        table.add_row(label, *(value(ok[sp]) if sp in ok else cal["spaces"][sp]["error"] for sp in spaces))

    row("neighbours", lambda c: str(c["neighbours"]))
    for q in PERCENTILES:
        row(f"p{q}", lambda c, q=q: f"{c['percentiles'][str(q)]:.3f}")
    row("run band", lambda c: _band(c["run_band"]))
    row("  below / kept / above", lambda c: _shares(c["run_band_shares"]))
    row("same-share band", lambda c: _band(c["transferred_band"]))
    row("  below / kept / above", lambda c: _shares(c["transferred_band_shares"]))
    return table


def _shares(s: dict) -> str:
    return f"{s['below']:.0%} / {s['kept']:.0%} / {s['above']:.0%}"


def bands_yaml(cal: dict) -> str:
    """The transferred bands as the `mine.bands` a config takes."""
    lines = ["mine:", "  bands:"]
    lines += [f"    {sp}: [{c['transferred_band'][0]}, {c['transferred_band'][1]}]" for sp, c in cal["spaces"].items() if "error" not in c]
    return "\n".join(lines)


def _band(b: list[float]) -> str:
    return f"({b[0]:.4g}, {b[1]:.4g})"
