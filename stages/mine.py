"""mine: heterogeneous kNN pairs, chosen from the neighbour lists search kept.

For each query image, its top-k neighbours in every mined space (from `neighbours/`); a
neighbour whose similarity lies inside the space's band (open interval) is a candidate
target. Candidates are the union over spaces, each remembering which spaces found it and how
strongly. Up to `pairs_per_query` targets are drawn per query (seeded); each pair gets the
query's other retrieved neighbours as hard negatives. Exact duplicates (same image bytes)
and near-duplicates (above the band in any space) never become targets or hard negatives.

The choice is a plain function of one query's neighbour lists (`union_neighbours`,
`choose_pairs`); the stage reads the lists, applies it and writes the pairs. One unit per
neighbours file: no search happens here, so a new band, pairs per query or number of hard
negatives costs seconds, not a kNN search.
"""

from __future__ import annotations

import math
import random
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, field_validator

from stages import catalog, neighbours, pairs, selection
from stages.base import Resources, Stage, Stats, Unit, atomic_path
from stages.knn.exact import unpack

Band = tuple[float, float]
ASSEMBLY_CHUNK = 4096  # queries whose neighbours are Python objects at any one time


def _check_band(v: Band) -> Band:
    lo, hi = v
    if not -1.0 <= lo < hi <= 1.0:
        raise ValueError(f"a band is [lo, hi] with -1 <= lo < hi <= 1 (got {list(v)})")
    return (float(lo), float(hi))


class MineSettings(neighbours.MiningScope):
    band: Band = Field((0.80, 0.96), description="keep neighbours with lo < similarity < hi")
    bands: dict[str, Band] = Field(default_factory=dict, description="per-space band overrides")
    pairs_per_query: int = Field(2, gt=0)
    hard_negatives: int = Field(4, ge=0)

    @field_validator("band")
    @classmethod
    def _band(cls, v: Band) -> Band:
        return _check_band(v)

    @field_validator("bands")
    @classmethod
    def _bands(cls, v: dict[str, Band]) -> dict[str, Band]:
        return {k: _check_band(b) for k, b in v.items()}

    def band_of(self, space: str) -> Band:
        return self.bands.get(space, self.band)


# --- the pair policy: plain functions of one query's neighbours ---------------------------------


@dataclass
class Neighbour:
    ordinal: int  # pack(catalog shard index, catalog row): the same image in every space
    hash: int
    scores: dict[str, float]  # every space that retrieved it


def union_neighbours(query: int, rows: dict[str, tuple[list, list, list]], j: int) -> dict[int, Neighbour]:
    """The union over spaces of query j's neighbours (itself excluded), by catalog ordinal.

    `rows[space]` = (ordinals, hashes, scores), each a list of per-query lists."""
    found: dict[int, Neighbour] = {}
    for space, (ordinals, hashes, scores) in rows.items():
        for ordinal, h, score in zip(ordinals[j], hashes[j], scores[j]):
            if ordinal >= 0 and ordinal != query:
                found.setdefault(ordinal, Neighbour(ordinal, h, {})).scores[space] = score
    return found


def choose_pairs(qid: str, qhash: int | None, found: dict[int, Neighbour], s: MineSettings, stats: Stats
                 ) -> list[tuple[Neighbour, dict[str, float], list[Neighbour]]]:  # fmt: skip
    """(target, its in-band scores by space, hard negatives hardest first) for up to `pairs_per_query` targets."""
    usable: list[Neighbour] = []
    candidates: list[tuple[Neighbour, dict[str, float]]] = []
    for nb in sorted(found.values(), key=lambda n: n.ordinal):
        if nb.hash == qhash:
            stats.counters["exact_duplicates"] += 1
            continue
        if any(score >= s.band_of(sp)[1] for sp, score in nb.scores.items()):
            stats.counters["near_duplicates"] += 1
            continue
        usable.append(nb)
        in_band = {sp: sc for sp, sc in nb.scores.items() if s.band_of(sp)[0] < sc}
        if in_band:
            candidates.append((nb, in_band))
        else:
            stats.counters["below_band"] += 1
    if not candidates:
        return []
    rng = random.Random(neighbours.query_rank(s.seed, qid))
    chosen = rng.sample(candidates, min(s.pairs_per_query, len(candidates)))
    chosen.sort(key=lambda c: c[0].ordinal)
    made = []
    for target, in_band in chosen:
        negatives = sorted(
            (n for n in usable if n.ordinal != target.ordinal and n.hash != target.hash),
            key=lambda n: (-hardest(n)[1], n.ordinal),
        )[: s.hard_negatives]
        if len(negatives) < s.hard_negatives:
            stats.counters["pairs_short_of_hard_negatives"] += 1
        made.append((target, in_band, negatives))
        for sp in in_band:
            stats.counters[f"pairs_found_by.{sp}"] += 1
    stats.counters["queries_with_pairs"] += 1
    return made


def hardest(nb: Neighbour) -> tuple[str, float]:
    """The space where a neighbour scores highest, and that score (ties: the first space by name)."""
    return max(sorted(nb.scores.items()), key=lambda kv: kv[1])


class PairColumns:
    """A unit's pairs column by column, neighbours as catalog ordinals: compact until the ids are written."""

    def __init__(self, spaces: list[str], hard_negatives: int):
        self.spaces, self.width = spaces, hard_negatives
        self.query, self.target, self.negatives = array("q"), array("q"), array("q")
        self.space_scores, self.negative_scores = array("f"), array("f")
        self.negative_spaces = array("b")  # index into `spaces` of each negative's hardest space; -1 pads

    def add(self, query_index: int, target: Neighbour, in_band: dict[str, float], negatives: list[Neighbour]) -> None:
        self.query.append(query_index)
        self.target.append(target.ordinal)
        self.space_scores.extend(in_band.get(sp, math.nan) for sp in self.spaces)
        pad = self.width - len(negatives)
        self.negatives.extend([n.ordinal for n in negatives] + [-1] * pad)
        hard = [hardest(n) for n in negatives]
        self.negative_scores.extend([score for _, score in hard] + [math.nan] * pad)
        self.negative_spaces.extend([self.spaces.index(sp) for sp, _ in hard] + [-1] * pad)

    def __len__(self) -> int:
        return len(self.query)


# --- the stage -----------------------------------------------------------------------------------


class MineStage(Stage):
    name = "mine"
    Settings = MineSettings
    settings: MineSettings
    version = "4"  # 4: a hard negative records the space of its score

    def resources(self) -> Resources:
        return Resources(cpus=self.settings.cpus)

    def reuse_key(self) -> dict:
        return self.settings.model_dump(mode="json", exclude={"cpus"})

    def mined_spaces(self) -> list[str]:
        files = neighbours.units(self.inputs["neighbours"])
        searched = neighbours.searched(self.inputs["neighbours"] / f"{files[0]}.parquet")[0] if files else []
        wanted = sorted(self.settings.spaces or searched)
        if missing := [s for s in wanted if s not in searched]:
            raise ValueError(f"mine.spaces: {missing} were not searched (searched: {searched})")
        if unknown := sorted(set(self.settings.bands) - set(searched)):
            raise ValueError(f"mine.bands: no embedded space named {unknown} (embedded: {searched})")
        return wanted

    def plan(self) -> list[list[Unit]]:
        self.mined_spaces()  # fail before any unit runs
        s = self.settings
        corpus = selection.images(self.inputs["catalog"], self.inputs.get("selection")) * s.corpus_fraction  # as search counts it
        t = neighbours.query_threshold(s.queries, round(corpus))
        return [[Unit(u, {"threshold": t}) for u in neighbours.units(self.inputs["neighbours"])]]

    def process(self, unit: Unit) -> Stats:
        spaces, s = self.mined_spaces(), self.settings
        table, hits = neighbours.read(self.inputs["neighbours"] / f"{unit.id}.parquet", spaces, s.k + 1)
        t = unit.payload["threshold"]
        keep = np.arange(table.num_rows) if t >= neighbours.FULL else np.flatnonzero(table["query_rank"].to_numpy() < np.uint64(t))
        ids = table["query_id"].take(pa.array(keep)).to_pylist()
        ordinals = table["query_ordinal"].to_numpy()[keep]
        qhashes = table["query_hash"].to_numpy()[keep]
        hits = {sp: tuple(a[keep] for a in h) for sp, h in hits.items()}
        stats = Stats(input=len(ids))
        columns = PairColumns(spaces, s.hard_negatives)
        for start in range(0, len(ids), ASSEMBLY_CHUNK):
            end = min(start + ASSEMBLY_CHUNK, len(ids))
            rows = {sp: tuple(a[start:end].tolist() for a in h) for sp, h in hits.items()}
            for i in range(start, end):
                found = union_neighbours(int(ordinals[i]), rows, i - start)
                qhash = int(qhashes[i]) or None  # 0: no space embedded the query
                made = choose_pairs(ids[i], qhash, found, s, stats)
                for target, in_band, negatives in made:
                    columns.add(i, target, in_band, negatives)
                if not made:
                    stats.reject("no_in_band_neighbour")
        stats.output = len(columns)
        with atomic_path(self.output / f"{unit.id}.parquet") as tmp:
            pq.write_table(self._pairs_table(ids, columns), tmp, compression="zstd", row_group_size=pairs.ROW_GROUP)
        return stats

    def _ids_of(self, ordinals: np.ndarray) -> pa.Array:
        """Catalog ids of catalog ordinals, reading each catalog shard's id column once."""
        if len(ordinals) == 0:
            return pa.array([], pa.string())
        unique, inverse = np.unique(ordinals, return_inverse=True)
        shard, rows = unpack(unique)
        names = catalog.shards(self.inputs["catalog"])
        parts = []
        for s in np.unique(shard):  # `unique` is sorted, so each shard's rows are contiguous and in order
            ids = catalog.read(self.inputs["catalog"], names[s], ok_only=False, columns=["id"])["id"].combine_chunks()
            parts.append(ids.take(pa.array(rows[shard == s])))
        return pa.concat_arrays(parts).take(pa.array(inverse.ravel()))

    def _pairs_table(self, query_ids: list[str], c: PairColumns) -> pa.Table:
        """`pairs.SCHEMA` rows from the columns; ids are looked up in the catalog only now."""
        n, spaces = len(c), c.spaces
        target_ords, neg_ords = np.asarray(c.target, np.int64), np.asarray(c.negatives, np.int64).reshape(n, c.width)
        has_neg = neg_ords >= 0
        ids = self._ids_of(np.concatenate([target_ords, neg_ords[has_neg]]))
        qids = pa.array(query_ids, pa.string()).take(pa.array(np.asarray(c.query, np.int64)))
        target_ids = ids.slice(0, n)
        space_scores = np.asarray(c.space_scores, np.float32).reshape(n, len(spaces))
        in_band = ~np.isnan(space_scores)
        space_names = pa.array(np.array(spaces, dtype=object)[np.nonzero(in_band)[1]].tolist(), pa.string())
        neg_scores = np.asarray(c.negative_scores, np.float32).reshape(n, c.width)
        neg_spaces = np.array(spaces, dtype=object)[np.asarray(c.negative_spaces, np.int64).reshape(n, c.width)[has_neg]]
        return pa.Table.from_arrays(
            [
                pa.array([pairs.pair_id(a, b) for a, b in zip(qids.to_pylist(), target_ids.to_pylist())], pa.string()),
                qids,
                target_ids,
                _lists(in_band.sum(1), [space_names, pa.array(space_scores[in_band])], pairs.SPACE_SCORE),
                _lists(has_neg.sum(1), [ids.slice(n), pa.array(neg_scores[has_neg]), pa.array(neg_spaces.tolist(), pa.string())], pairs.SCORED_ID),
            ],
            schema=pairs.SCHEMA,
        )


def _lists(counts: np.ndarray, values: list[pa.Array], struct: pa.StructType) -> pa.ListArray:
    """A list<struct> column from per-row counts and the flattened struct fields."""
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    fields = [struct.field(i) for i in range(struct.num_fields)]
    return pa.ListArray.from_arrays(offsets, pa.StructArray.from_arrays(values, fields=fields), type=pa.list_(struct))
