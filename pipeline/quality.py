"""Whether a run's pairs and instructions are right, on a corpus that knows the truth.

The synthetic corpus (`megasynth make-corpus`) records every scene's family, variant and
attributes in its json; a run that keeps them (`corpus.keep_fields: [attributes]`) has them in
the catalog's `meta` column. From two scenes' attributes, `pair_truth` says whether a mined pair
is a true relation, a near-duplicate that slipped through, or unrelated; `changes` lists what the
target changes and the words that name each new value, and `names_change` says whether an
instruction names one. `summary(run)` applies them to a run's pairs and annotations.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.rundir import Ledger
from stages import annotations, catalog, pairs
from demo.corpus import NUMBER_WORDS, SHORT_NOUNS, VARIATIONS

TRUE, DUPLICATE, UNRELATED, UNKNOWN = "true", "duplicate", "unrelated", "unknown"
VERDICTS = (TRUE, DUPLICATE, UNRELATED)
# A variant of the generator changes one or two of VARIATIONS; two scenes of different families
# that differ only that much share attributes as a family does.
MAX_SHARED_CHANGES = 2

COLOUR_WORDS = {"gray": ("gray", "grey"), "centre": ("center", "centre")}
TEXTURE_WORDS = {
    "brick": ("brick", "bricks"), "grass": ("grass", "grassy"), "gravel": ("gravel",),
    "moon": ("moon", "lunar", "crater", "craters"), "hubble": ("stars", "starry", "night sky", "galaxies"),
    "page": ("page", "printed", "text"),
}  # fmt: skip
BACKGROUND_KIND_WORDS = {
    "gradient": ("gradient", "fades"), "stripes": ("stripes", "striped"), "checks": ("checkerboard", "checks", "checkered"),
}  # fmt: skip
LIGHTING_WORDS = {
    "neutral": ("neutral", "evenly", "even light"), "bright": ("bright", "brightly", "brighter"),
    "dim": ("dim", "dimly", "dark", "darker"), "warm": ("warm", "warmer", "golden"),
    "cool": ("cool", "cooler", "bluish", "blue tint"), "backlit": ("backlit", "backlighting", "silhouette", "glow"),
}  # fmt: skip
LAYOUT_WORDS = {
    "left": ("left",), "right": ("right",), "centre": ("center", "centre", "middle"), "row": ("row",),
    "grid": ("grid",), "scattered": ("scattered", "spread out", "random"),
}  # fmt: skip


@dataclass(frozen=True)
class Change:
    axis: str  # one of the generator's VARIATIONS, or "object_group" / "effect" (no variant changes those)
    terms: tuple[str, ...]  # words that name the target's new value; empty when nothing names it


def attributes(meta: str | None) -> dict | None:
    """A catalog `meta` value -> the scene's attributes, or None when the source had none."""
    if not meta:
        return None
    value = json.loads(meta).get("attributes")
    return value if isinstance(value, dict) and "family" in value else None


def _colour_terms(colour: str | None) -> tuple[str, ...]:
    return () if colour is None else COLOUR_WORDS.get(colour, (colour,))


def _kind_terms(kind: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys((kind, *SHORT_NOUNS.get(kind, ()))))


def _count_terms(count: int) -> tuple[str, ...]:
    # "one" alone would match "like this one"; a single object is named as such
    return ("single", "only one", "just one") if count == 1 else (NUMBER_WORDS.get(count, str(count)), str(count))


def _background_terms(bg: dict) -> set[str]:
    if bg.get("kind") == "texture":
        return set(TEXTURE_WORDS.get(bg.get("texture"), (str(bg.get("texture")),)))
    words = {w for c in bg.get("colours") or () for w in _colour_terms(c)}
    return words | set(BACKGROUND_KIND_WORDS.get(bg.get("kind"), ()))


def _match_groups(query: list[dict], target: list[dict]) -> tuple[list[tuple[dict, dict]], list[dict], list[dict]]:
    """Object groups paired up: same kind first (a scene has one group per kind), then the rest in order.
    Returns the pairs, the target's groups without a partner and the query's."""
    left = list(query)
    same = []
    for t in target:
        q = next((q for q in left if q["kind"] == t["kind"]), None)
        if q is not None:
            left.remove(q)
        same.append((q, t))
    matched, target_only = [], []
    for q, t in same:
        if q is None and left:
            q = left.pop(0)
        if q is None:
            target_only.append(t)
        else:
            matched.append((q, t))
    return matched, target_only, left


def changes(query: dict, target: dict) -> list[Change]:
    """What differs from query to target, one entry per changed attribute, as the generator's variants change them."""
    out: list[Change] = []
    matched, target_only, query_only = _match_groups(query.get("objects") or [], target.get("objects") or [])
    for q, t in matched:
        if q["kind"] != t["kind"]:
            out.append(Change("object_kind", _kind_terms(t["kind"])))
        if q.get("colour") != t.get("colour") and not (q["kind"] != t["kind"] and t.get("colour") is None):  # a photo has no colour
            out.append(Change("object_colour", _colour_terms(t.get("colour"))))
        if q.get("count") != t.get("count"):
            out.append(Change("object_count", _count_terms(int(t["count"]))))
    # a group one scene has and the other has not: no variant does that
    out += [Change("object_group", _kind_terms(t["kind"])) for t in target_only] + [Change("object_group", ()) for _ in query_only]
    qbg, tbg = query.get("background") or {}, target.get("background") or {}
    if qbg != tbg:
        out.append(Change("background", tuple(sorted(_background_terms(tbg) - _background_terms(qbg)))))
    for axis, words in (("lighting", LIGHTING_WORDS), ("layout", LAYOUT_WORDS)):
        if query.get(axis) != target.get(axis):
            new = set(words.get(target.get(axis), ())) - set(words.get(query.get(axis), ()))
            out.append(Change(axis, tuple(sorted(new))))
    if query.get("effect") != target.get("effect"):
        out.append(Change("effect", ()))
    return out


def pair_truth(query: dict | None, target: dict | None) -> str:
    """TRUE (same family, other variant; or another family that differs as a variant would), DUPLICATE
    (the same scene: a near or exact copy slipped through), UNRELATED, or UNKNOWN without attributes."""
    if query is None or target is None:
        return UNKNOWN
    if query["family"] == target["family"]:
        return DUPLICATE if query["variant"] == target["variant"] else TRUE
    found = changes(query, target)
    if not found:
        return DUPLICATE  # two families that happen to describe the same scene
    if len(found) <= MAX_SHARED_CHANGES and all(c.axis in VARIATIONS for c in found):
        return TRUE
    return UNRELATED


@lru_cache(maxsize=4096)
def _term_pattern(term: str) -> re.Pattern:
    # word boundaries; a plural "s"/"es" still names the thing ("circle" in "circles")
    return re.compile(r"\b" + re.escape(term.lower()) + r"(?:e?s)?\b")


def names_change(instruction: str, found: list[Change]) -> bool:
    """Whether the instruction names the new value of at least one changed attribute."""
    text = instruction.lower()
    return any(_term_pattern(t).search(text) for c in found for t in c.terms)


# --- a run's numbers --------------------------------------------------------------------------


def _shares(counts: Counter) -> dict:
    known = sum(counts[v] for v in VERDICTS)
    out = {"pairs": known, "unknown": counts[UNKNOWN]}
    out.update({v: round(counts[v] / known, 4) if known else None for v in VERDICTS})
    return out


def summary(run_dir: str | Path) -> dict | None:
    """Pair truth per run and per space, and instruction faithfulness, for a run whose catalog carries the
    synthetic corpus's attributes; None when it carries none (a real corpus, `keep_fields` without them) or
    the run has no pairs yet.

        {"truth": {"all": SHARES, "spaces": {space: SHARES}},          SHARES: {"pairs", "unknown", "true",
         "faithfulness": {"pairs", "instructions", "faithful",                   "duplicate", "unrelated"}
                          "by_change": {axis: share}}}

    Shares are of the pairs with attributes on both sides; a pair counts in every space that found it."""
    ledger = Ledger(Path(run_dir))
    pairs_dir = ledger.source("mine") / "pairs"
    rows = [r for unit in pairs.units(pairs_dir) for r in pairs.read(pairs_dir, unit)]
    ids = {r["query_id"] for r in rows} | {r["target_id"] for r in rows}
    found = run_attributes(run_dir, ids)
    if found is None:
        return None

    verdict: dict[str, str] = {}
    overall, per_space = Counter(), {}
    for r in rows:
        v = verdict[r["pair_id"]] = pair_truth(found.get(r["query_id"]), found.get(r["target_id"]))
        overall[v] += 1
        for s in r["spaces"]:
            per_space.setdefault(s["space"], Counter())[v] += 1

    ann_dir = ledger.source("annotate") / "annotations"
    faithful, total, by_axis = 0, 0, {}
    annotated_true = 0
    if ann_dir.is_dir():
        for unit in annotations.units(ann_dir):
            for a in annotations.read(ann_dir, unit):
                if verdict.get(a["pair_id"]) != TRUE or not a["instructions"]:
                    continue
                found_changes = [c for c in changes(found[a["query_id"]], found[a["target_id"]]) if c.terms]
                if not found_changes:
                    continue
                annotated_true += 1
                for text in a["instructions"]:
                    hit = names_change(text, found_changes)
                    faithful, total = faithful + hit, total + 1
                    for axis in {c.axis for c in found_changes}:
                        n = by_axis.setdefault(axis, [0, 0])
                        n[0] += names_change(text, [c for c in found_changes if c.axis == axis])
                        n[1] += 1
    return {
        "truth": {"all": _shares(overall), "spaces": {s: _shares(c) for s, c in sorted(per_space.items())}},
        "faithfulness": {
            "pairs": annotated_true,
            "instructions": total,
            "faithful": round(faithful / total, 4) if total else None,
            "by_change": {a: round(h / n, 4) for a, (h, n) in sorted(by_axis.items())},
        },
    }


def run_attributes(run_dir: str | Path, ids: set[str]) -> dict[str, dict] | None:
    """The scene attributes of these catalog ids (those that have them), or None when the run's catalog has none."""
    folder = Ledger(Path(run_dir)).source("ingest") / "catalog"
    shards = catalog.shards(folder)
    if not ids or not shards or "meta" not in pq.read_schema(catalog.catalog_file(folder, shards[0])).names:
        return None  # nothing asked, or a catalog written before the meta column existed
    found = {i: a for i, row in catalog.lookup(folder, ids, ["meta"]).items() if (a := attributes(row["meta"])) is not None}
    return found or None


# --- the ground truth in words ------------------------------------------------------------------

LIGHTING_PHRASES = {"neutral": "in even, neutral light", "bright": "brightly lit", "dim": "in dim light",
                    "warm": "in warm light", "cool": "in cool light", "backlit": "backlit"}  # fmt: skip


def _group_phrase(g: dict) -> str:
    from demo.corpus import ObjectGroup, short_group_phrase

    return short_group_phrase(ObjectGroup(g["kind"], g.get("colour"), int(g["count"])), digits=False)


def _background_phrase(bg: dict) -> str:
    from demo.corpus import Background, short_background

    return short_background(Background(bg["kind"], tuple(bg.get("colours") or ()), bg.get("texture"), bg.get("direction")))


def change_text(query: dict, target: dict) -> str | None:
    """What turns the query's scene into the target's, in the generator's caption words: "The same picture,
    but with three blue circles instead of three red circles and in warm light." None when they do not differ."""
    from demo.corpus import PLACEMENTS, join_list

    parts = []
    matched, target_only, query_only = _match_groups(query.get("objects") or [], target.get("objects") or [])
    for q, t in matched:
        if (q["kind"], q.get("colour"), q.get("count")) != (t["kind"], t.get("colour"), t.get("count")):
            parts.append(f"with {_group_phrase(t)} instead of {_group_phrase(q)}")
    parts += [f"with {_group_phrase(t)}" for t in target_only] + [f"without {_group_phrase(q)}" for q in query_only]
    if (query.get("background") or {}) != (target.get("background") or {}):
        parts.append(f"on {_background_phrase(target['background'])}")
    if query.get("lighting") != target.get("lighting") and target.get("lighting") in LIGHTING_PHRASES:
        parts.append(LIGHTING_PHRASES[target["lighting"]])
    if query.get("layout") != target.get("layout") and target.get("layout") in PLACEMENTS:
        parts.append(f"with the objects {PLACEMENTS[target['layout']][0]}")
    return f"The same picture, but {join_list(parts)}." if parts else None
