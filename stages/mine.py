"""mine: heterogeneous kNN pairs.

For each query image, its top-k neighbours in every embedding space; a neighbour whose
similarity lies inside the space's band (open interval) is a candidate target. Candidates
are the union over spaces, each remembering which spaces found it and how strongly. Up to
`pairs_per_query` targets are drawn per query (seeded); each pair gets the query's other
retrieved neighbours as hard negatives. Exact duplicates (same image bytes) and
near-duplicates (above the band in any space) never become targets or hard negatives.

Units group catalog shards into query batches of about `queries_per_unit` queries; the base
of each space is streamed shard by shard, so memory is bounded by the unit, not the corpus.
"""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from pydantic import Field, field_validator

from stages import catalog, embeddings, pairs
from stages.base import Resources, Stage, StageSettings, Stats, Unit, atomic_path
from stages.knn.exact import exact_search, unpack

Band = tuple[float, float]


class MineSettings(StageSettings):
    spaces: list[str] | None = Field(None, description="spaces to mine; default: every embedded space")
    k: int = Field(32, gt=0, description="neighbours retrieved per query and space")
    band: Band = Field((0.80, 0.96), description="keep neighbours with lo < similarity < hi")
    bands: dict[str, Band] = Field(default_factory=dict, description="per-space band overrides")
    queries: int | float | None = Field(None, description="all images (null), a count, or a fraction in (0, 1]")
    pairs_per_query: int = Field(2, gt=0)
    hard_negatives: int = Field(4, ge=0)
    queries_per_unit: int = Field(100_000, gt=0)
    seed: int | None = None
    cpus: float = Field(1.0, gt=0)

    @field_validator("band")
    @classmethod
    def _band(cls, v: Band) -> Band:
        return _check_band(v)

    @field_validator("bands")
    @classmethod
    def _bands(cls, v: dict[str, Band]) -> dict[str, Band]:
        return {k: _check_band(b) for k, b in v.items()}

    @field_validator("queries")
    @classmethod
    def _queries(cls, v):
        if isinstance(v, float) and not 0 < v <= 1:
            raise ValueError("a fraction of queries must be in (0, 1]; use an integer for a count")
        if isinstance(v, int) and v <= 0:
            raise ValueError("the number of queries must be positive")
        return v

    def band_of(self, space: str) -> Band:
        return self.bands.get(space, self.band)


def _check_band(v: Band) -> Band:
    lo, hi = v
    if not -1.0 <= lo < hi <= 1.0:
        raise ValueError(f"a band is [lo, hi] with -1 <= lo < hi <= 1 (got {list(v)})")
    return (float(lo), float(hi))


def query_rank(seed: int, id_: str) -> int:
    """A seeded pseudo-random rank per image, independent of sharding: queries are the lowest ranks."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{id_}".encode(), digest_size=8).digest(), "big")


@dataclass
class Neighbour:
    id: str
    hash: int
    scores: dict[str, float]  # every space that retrieved it


class MineStage(Stage):
    name = "mine"
    Settings = MineSettings
    settings: MineSettings

    def resources(self) -> Resources:
        return Resources(cpus=self.settings.cpus)

    def mined_spaces(self) -> list[str]:
        available = embeddings.spaces(self.inputs["embeddings"])
        wanted = self.settings.spaces or available
        missing = [s for s in wanted if s not in available]
        if missing:
            raise ValueError(f"mine.spaces: {missing} were not embedded (embedded: {available})")
        if unknown := sorted(set(self.settings.bands) - set(available)):
            raise ValueError(f"mine.bands: no embedded space named {unknown} (embedded: {available})")
        return wanted

    def plan(self) -> list[list[Unit]]:
        self.mined_spaces()  # fail before any unit runs
        shards = catalog.shards(self.inputs["catalog"])
        ids_per_shard = {s: catalog.read(self.inputs["catalog"], s, columns=["id"])["id"].to_pylist() for s in shards}
        threshold = self._rank_threshold([i for ids in ids_per_shard.values() for i in ids])
        units, group, count = [], [], 0
        for s in shards:
            n = sum(1 for i in ids_per_shard[s] if query_rank(self.settings.seed, i) <= threshold)
            if n == 0:
                continue
            group.append(s)
            count += n
            if count >= self.settings.queries_per_unit:
                units.append(group)
                group, count = [], 0
        if group:
            units.append(group)
        return [[Unit(f"queries-{i:05d}", {"shards": g, "threshold": threshold}) for i, g in enumerate(units)]]

    def _rank_threshold(self, ids: list[str]) -> int:
        q = self.settings.queries
        if q is None or not ids:
            return 2**64
        n = min(len(ids), q if isinstance(q, int) else max(1, round(q * len(ids))))
        ranks = sorted(query_rank(self.settings.seed, i) for i in ids)
        return ranks[n - 1]

    def process(self, unit: Unit) -> Stats:
        import faiss

        faiss.omp_set_num_threads(max(1, int(self.settings.cpus)))
        spaces = self.mined_spaces()
        emb = self.inputs["embeddings"]
        stats = Stats()
        query_ids: list[str] = []
        for s in unit.payload["shards"]:
            ids = catalog.read(self.inputs["catalog"], s, columns=["id"])["id"].to_pylist()
            query_ids += [i for i in ids if query_rank(self.settings.seed, i) <= unit.payload["threshold"]]
        stats.input = len(query_ids)

        neighbours: dict[str, dict[str, Neighbour]] = defaultdict(dict)  # query -> neighbour id -> scores
        query_hash: dict[str, int] = {}
        base_rows: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
        for space in spaces:
            qids, qhash, qvec = self._query_vectors(space, unit.payload["shards"], set(query_ids))
            query_hash.update(zip(qids, (int(h) for h in qhash)))
            shard_names = embeddings.shards(emb, space)
            base = ((i, embeddings.load(emb, space, sh, ("vectors",))[0]) for i, sh in enumerate(shard_names))
            D, L = exact_search(qvec, base, self.settings.k + 1)  # +1: the query finds itself
            sh_idx, rows = unpack(L)
            for qi, qid in enumerate(qids):
                for score, si, row, label in zip(D[qi], sh_idx[qi], rows[qi], L[qi]):
                    if label < 0:
                        continue
                    key = (space, shard_names[si])
                    if key not in base_rows:
                        base_rows[key] = embeddings.load(emb, space, key[1], ("ids", "hashes"))
                    nid, nhash = str(base_rows[key][0][row]), int(base_rows[key][1][row])
                    if nid == qid:
                        continue
                    nb = neighbours[qid].setdefault(nid, Neighbour(nid, nhash, {}))
                    nb.scores[space] = float(score)

        rows_out = []
        for qid in query_ids:
            made = self._pairs_for(qid, query_hash.get(qid), neighbours.get(qid, {}), stats)
            rows_out += made
            if not made:
                stats.reject("no_in_band_neighbour")
        stats.output = len(rows_out)
        with atomic_path(self.output / f"{unit.id}.parquet") as tmp:
            pairs.write(tmp, rows_out)
        return stats

    def _query_vectors(self, space: str, shards: list[str], wanted: set[str]):
        ids, hashes, vecs = [], [], []
        for s in shards:
            if not embeddings.space_file(self.inputs["embeddings"], space, s).exists():
                continue
            i, h, v = embeddings.load(self.inputs["embeddings"], space, s)
            keep = np.array([x in wanted for x in i], dtype=bool)
            ids += list(i[keep])
            hashes.append(h[keep])
            vecs.append(v[keep])
        if not vecs:
            return [], np.zeros(0, np.uint64), np.zeros((0, 1), np.float32)
        return [str(x) for x in ids], np.concatenate(hashes), np.concatenate(vecs).astype(np.float32)

    def _pairs_for(self, qid: str, qhash: int | None, found: dict[str, Neighbour], stats: Stats) -> list[dict]:
        s = self.settings
        usable: list[Neighbour] = []
        candidates: list[tuple[Neighbour, dict[str, float]]] = []
        for nb in sorted(found.values(), key=lambda n: n.id):
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
        rng = random.Random(query_rank(s.seed, qid))
        chosen = rng.sample(candidates, min(s.pairs_per_query, len(candidates)))
        chosen.sort(key=lambda c: c[0].id)
        rows = []
        for target, in_band in chosen:
            negatives = sorted(
                (n for n in usable if n.id != target.id and n.hash != target.hash),
                key=lambda n: (-max(n.scores.values()), n.id),
            )[: s.hard_negatives]
            if len(negatives) < s.hard_negatives:
                stats.counters["pairs_short_of_hard_negatives"] += 1
            rows.append(
                {
                    "pair_id": pairs.pair_id(qid, target.id),
                    "query_id": qid,
                    "target_id": target.id,
                    "spaces": [{"space": sp, "score": in_band[sp]} for sp in sorted(in_band)],
                    "hard_negatives": [{"id": n.id, "score": max(n.scores.values())} for n in negatives],
                }
            )
            for sp in in_band:
                stats.counters[f"pairs_found_by.{sp}"] += 1
        stats.counters["queries_with_pairs"] += 1
        return rows
