"""mine: heterogeneous kNN pairs.

For each query image, its top-k neighbours in every embedding space; a neighbour whose
similarity lies inside the space's band (open interval) is a candidate target. Candidates
are the union over spaces, each remembering which spaces found it and how strongly. Up to
`pairs_per_query` targets are drawn per query (seeded); each pair gets the query's other
retrieved neighbours as hard negatives. Exact duplicates (same image bytes) and
near-duplicates (above the band in any space) never become targets or hard negatives.

Search (`mine.backend`, see `stages.knn`): faiss with any index factory string -- `Flat`
streams the base shard by shard, exactly; IVF, PQ, HNSW ... are built once per space by an
`index-{space}` unit in a first wave and searched by every query unit -- or `torch-exact`,
a tiled matmul with a running top-k on a GPU (or the CPU). Every backend proposes
k+1+`rerank` candidates per query; their scores are then recomputed exactly from the stored
float16 vectors (`stages.knn.rescore`) and the band and the top-k are applied to those, so
exact backends give identical pairs, and rounding (float16, PQ) cannot move a neighbour
across a band edge.

Units group catalog shards into query batches of about `queries_per_unit` queries. Neighbours
are identified by their catalog position (shard, row), never by a corpus-wide table, so a
worker's memory is bounded by its unit and one base shard, not by the corpus (formulas in
`stages.knn`).
"""

from __future__ import annotations

import hashlib
import math
import random
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, ValidationInfo, field_validator

from stages import catalog, embeddings, pairs
from stages.base import Resources, Stage, StageSettings, Stats, Unit, atomic_path
from stages.knn import device as knn_device
from stages.knn import faiss_index
from stages.knn.exact import exact_search, pack, unpack
from stages.knn.rescore import Rescorer
from stages.knn.stream import prefetch

Band = tuple[float, float]
ALL_QUERIES = 2**64 - 1  # the highest query rank: every image is a query
ASSEMBLY_CHUNK = 4096  # queries whose neighbours are Python objects at any one time


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
    backend: Literal["faiss", "torch-exact"] = Field("faiss", description="faiss (any index factory string) or torch-exact (tiled matmul)")
    index: str = Field(
        "Flat",
        description="faiss index factory string, inner product: Flat (exact, streamed), IVF4096,Flat, IVF4096,PQ64np, HNSW32, ... "
        "(np: skip PQ's polysemous training, which mine does not use)",
    )
    search_params: str = Field("", description="faiss search parameters, e.g. nprobe=64 (IVF) or efSearch=128 (HNSW); empty: faiss defaults")
    train_size: int = Field(200_000, gt=0, description="vectors sampled (seeded) across the space to train IVF / PQ indexes")
    rerank: int = Field(8, ge=0, description="candidates fetched beyond k+1 and re-scored exactly before the top-k is cut; raise it for PQ")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: a GPU when the backend can use one on this machine")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field("auto", description="torch-exact matmul dtype; auto: float32 on CPU, float16 on cuda")
    query_block: int = Field(8192, gt=0, description="queries per search block (both backends)")
    base_block: int | None = Field(None, gt=0, description="torch-exact: base rows per block; default 65536 on cuda, 4096 on cpu")
    gpus: float | None = Field(None, ge=0, description="per worker; default 1 when the device is cuda")

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

    @field_validator("index")
    @classmethod
    def _index(cls, v: str, info: ValidationInfo) -> str:
        if info.data.get("backend") == "torch-exact" and v != "Flat":
            raise ValueError("applies to backend faiss only; torch-exact always searches exactly (leave mine.index at Flat)")
        faiss_index.check_factory(v)
        return v

    @field_validator("search_params")
    @classmethod
    def _search_params(cls, v: str, info: ValidationInfo) -> str:
        if v and info.data.get("backend") == "torch-exact":
            raise ValueError("applies to backend faiss only")
        if "index" in info.data:
            faiss_index.check_search_params(info.data["index"], v)
        return v

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str, info: ValidationInfo) -> str:
        if v != "auto" and info.data.get("backend") == "faiss":
            raise ValueError("applies to backend torch-exact only (faiss searches in float32)")
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
    ordinal: int  # pack(catalog shard index, catalog row): the same image in every space
    hash: int
    scores: dict[str, float]  # every space that retrieved it


@dataclass
class Queries:
    """The queries of one unit, in catalog order."""

    ids: list[str]
    ordinals: np.ndarray  # int64, pack(catalog shard index, catalog row)
    hashes: np.ndarray = field(init=False)  # uint64, filled from whichever space embedded the image
    has_hash: np.ndarray = field(init=False)

    def __post_init__(self):
        self.hashes = np.zeros(len(self.ids), np.uint64)
        self.has_hash = np.zeros(len(self.ids), bool)


@dataclass
class Hits:
    """One space's top k+1 per query (rows aligned with the unit's queries), by exact score then catalog position."""

    ordinal: np.ndarray  # int64 [nq, k+1], -1 where none
    hash: np.ndarray  # uint64
    score: np.ndarray  # float32, exact

    @classmethod
    def empty(cls, nq: int, width: int) -> "Hits":
        return cls(np.full((nq, width), -1, np.int64), np.zeros((nq, width), np.uint64), np.full((nq, width), -np.inf, np.float32))


class PairColumns:
    """A unit's pairs column by column, neighbours as catalog ordinals: compact until the ids are written."""

    def __init__(self, spaces: list[str], hard_negatives: int):
        self.spaces, self.width = spaces, hard_negatives
        self.query, self.target, self.negatives = array("q"), array("q"), array("q")
        self.space_scores, self.negative_scores = array("f"), array("f")

    def add(self, query_index: int, target: Neighbour, in_band: dict[str, float], negatives: list[Neighbour]) -> None:
        self.query.append(query_index)
        self.target.append(target.ordinal)
        self.space_scores.extend(in_band.get(sp, math.nan) for sp in self.spaces)
        pad = self.width - len(negatives)
        self.negatives.extend([n.ordinal for n in negatives] + [-1] * pad)
        self.negative_scores.extend([max(n.scores.values()) for n in negatives] + [math.nan] * pad)

    def __len__(self) -> int:
        return len(self.query)


class MineStage(Stage):
    name = "mine"
    Settings = MineSettings
    settings: MineSettings
    version = "2"  # 2: candidates re-scored exactly; ties and draws ordered by catalog position
    # A worker keeps its device, its thread settings and any loaded index across units.
    loads_model = True

    def __init__(self, settings: MineSettings, inputs: dict[str, Path], output: Path):
        super().__init__(settings, inputs, output)
        self._indexes: dict[str, tuple] = {}  # space -> (file mtime, loaded index): loaded once per worker, reused by every unit
        self._catalog_shards: dict[str, int] | None = None

    def resources(self) -> Resources:
        return Resources.of(self.settings.cpus, self.settings.gpus, self.device() == "cuda")

    def device(self) -> str:
        return knn_device.resolve(self.settings.device, self.settings.backend)

    def builds_index(self) -> bool:
        return self.settings.backend == "faiss" and self.settings.index != "Flat"

    def mined_spaces(self) -> list[str]:
        available = embeddings.spaces(self.inputs["embeddings"])
        wanted = self.settings.spaces or available
        missing = [s for s in wanted if s not in available]
        if missing:
            raise ValueError(f"mine.spaces: {missing} were not embedded (embedded: {available})")
        if unknown := sorted(set(self.settings.bands) - set(available)):
            raise ValueError(f"mine.bands: no embedded space named {unknown} (embedded: {available})")
        return wanted

    # --- planning --------------------------------------------------------------------------

    def plan(self) -> list[list[Unit]]:
        spaces = self.mined_spaces()  # fail before any unit runs
        if self.builds_index():
            for space in spaces:
                self._check_index_at_dim(space)
        queries = self._query_units()
        if not self.builds_index():
            return [queries]
        return [[Unit(f"index-{space}", {"space": space}) for space in spaces], queries]

    def _check_index_at_dim(self, space: str) -> None:
        d = self._dim(space)
        if d is None:  # nothing embedded in this space: nothing to index
            return
        try:
            faiss_index.check_factory(self.settings.index, d)
        except ValueError as e:
            raise ValueError(f"mine.index: {e} (space {space})") from None

    def _query_units(self) -> list[Unit]:
        shards = catalog.shards(self.inputs["catalog"])
        if self.settings.queries is None:  # every OK image is a query: no ranks to compute
            threshold = ALL_QUERIES
            counts = [catalog.read(self.inputs["catalog"], s, columns=["status"]).num_rows for s in shards]
        else:
            ranks = [self._ok_ranks(s) for s in shards]
            threshold = self._rank_threshold(ranks)
            counts = [int(np.count_nonzero(r <= threshold)) for r in ranks]
        units, group, count = [], [], 0
        for s, n in zip(shards, counts):
            if n == 0:
                continue
            group.append(s)
            count += n
            if count >= self.settings.queries_per_unit:
                units.append(group)
                group, count = [], 0
        if group:
            units.append(group)
        return [Unit(f"queries-{i:05d}", {"shards": g, "threshold": threshold}) for i, g in enumerate(units)]

    def _ok_ranks(self, shard: str) -> np.ndarray:
        ids = catalog.read(self.inputs["catalog"], shard, columns=["id"])["id"].to_pylist()
        return np.fromiter((query_rank(self.settings.seed, i) for i in ids), dtype=np.uint64, count=len(ids))

    def _rank_threshold(self, ranks: list[np.ndarray]) -> int:
        q, total = self.settings.queries, sum(len(r) for r in ranks)
        if q is None or total == 0:
            return ALL_QUERIES
        n = min(total, q if isinstance(q, int) else max(1, round(q * total)))
        return int(np.partition(np.concatenate(ranks), n - 1)[n - 1])

    # --- units -----------------------------------------------------------------------------

    def setup(self) -> None:
        self._threads()

    def process(self, unit: Unit) -> Stats:
        self._threads()
        if unit.id.startswith("index-"):
            return self._build_index(unit.payload["space"])
        return self._mine(unit)

    def _threads(self) -> None:
        import faiss
        import torch

        n = max(1, int(self.settings.cpus))
        faiss.omp_set_num_threads(n)
        torch.set_num_threads(n)

    def _build_index(self, space: str) -> Stats:
        import faiss

        s, emb = self.settings, self.inputs["embeddings"]
        names = embeddings.shards(emb, space)
        sizes = [len(embeddings.load(emb, space, n, ("hashes",))[0]) for n in names]
        if not any(sizes):
            return Stats()  # nothing embedded in this space: nothing to index, nothing to search
        if not faiss_index.builds_in_parallel_deterministically(s.index):
            faiss.omp_set_num_threads(1)
        try:
            index = faiss_index.build(s.index, self._dim(space), lambda: self._base(space), sizes, s.train_size, s.seed or 0, self._faiss_gpu())
        finally:
            self._threads()
        faiss_index.save(index, self._index_path(space), names, sizes, s.index)
        stats = Stats()
        stats.counters[f"indexed.{space}"] = int(index.ntotal)
        return stats

    def _mine(self, unit: Unit) -> Stats:
        q = self._unit_queries(unit.payload["shards"], unit.payload["threshold"])
        stats = Stats(input=len(q.ids))
        hits = {space: self._space_hits(space, unit.payload["shards"], q) for space in self.mined_spaces()}
        columns = self._assemble(q, hits, stats)
        stats.output = len(columns)
        table = self._pairs_table(q, columns)
        with atomic_path(self.output / f"{unit.id}.parquet") as tmp:
            pq.write_table(table, tmp, compression="zstd")  # as pairs.write, built column by column
        return stats

    def _unit_queries(self, shards: list[str], threshold: int) -> Queries:
        ids, ordinals = [], []
        for s in shards:
            t = catalog.read(self.inputs["catalog"], s, ok_only=False, columns=["id", "status"])
            rows = [
                row
                for row, (i, status) in enumerate(zip(t["id"].to_pylist(), t["status"].to_pylist()))
                if status == catalog.OK and (threshold == ALL_QUERIES or query_rank(self.settings.seed, i) <= threshold)
            ]
            ids += t["id"].take(pa.array(rows, pa.int64())).to_pylist()
            ordinals.append(pack(self._catalog_index(s), np.array(rows, dtype=np.int64)))
        return Queries(ids, np.concatenate(ordinals) if ordinals else np.zeros(0, np.int64))

    # --- search: candidates from the backend, then exact scores --------------------------------

    def _space_hits(self, space: str, shards: list[str], q: Queries) -> Hits:
        width = self.settings.k + 1  # +1: the query finds itself
        hits = Hits.empty(len(q.ids), width)
        pos, vectors = self._query_vectors(space, shards, q)
        if len(pos):
            labels = self._search(space, vectors, width + self.settings.rerank)
            hits.ordinal[pos], hits.hash[pos], hits.score[pos] = self._exact_top(space, vectors, labels, width)
        return hits

    def _query_vectors(self, space: str, shards: list[str], q: Queries) -> tuple[np.ndarray, np.ndarray]:
        """This space's float16 vectors of the unit's queries, and which query each row is."""
        index_of = {i: n for n, i in enumerate(q.ids)}
        pos, vecs = [], []
        for s in shards:
            if not embeddings.space_file(self.inputs["embeddings"], space, s).exists():
                continue
            ids, hashes, v = embeddings.load(self.inputs["embeddings"], space, s)
            rows = np.array([r for r, i in enumerate(ids.tolist()) if i in index_of], dtype=np.int64)
            if len(rows) == 0:  # also skips an empty shard whose file (older embed) has shape (0, 0)
                continue
            p = np.array([index_of[i] for i in ids[rows].tolist()], dtype=np.int64)
            q.hashes[p], q.has_hash[p] = hashes[rows], True
            pos.append(p)
            vecs.append(v[rows])
        if not vecs:
            return np.zeros(0, np.int64), np.zeros((0, 1), np.float16)
        return np.concatenate(pos), np.concatenate(vecs)

    def _search(self, space: str, vectors: np.ndarray, k: int) -> np.ndarray:
        """Labels pack(space shard index, row) of each query's top-k candidates under the backend's own scores."""
        s = self.settings
        if self.builds_index():
            return self._loaded_index(space).search(vectors, k, s.query_block)[1]
        if s.backend == "torch-exact":
            from stages.knn.torch_exact import TorchExact, compute_dtype

            device = self.device()
            return TorchExact(device, compute_dtype(s.dtype, device), s.query_block, s.base_block).search(vectors, self._base(space), k)[1]
        return exact_search(vectors, self._base(space), k, s.query_block, gpu=self._faiss_gpu())[1]

    def _exact_top(self, space: str, vectors: np.ndarray, labels: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Exact scores, catalog ordinals and hashes of every candidate, one base shard at a time; the top `width` of each row."""
        emb = self.inputs["embeddings"]
        names = embeddings.shards(emb, space)
        scores = np.full(labels.shape, -np.inf, np.float32)
        ordinals = np.full(labels.shape, -1, np.int64)
        hashes = np.zeros(labels.shape, np.uint64)
        rescorer = Rescorer(vectors, self._rescore_device())
        for shard, flat in _by_shard(labels):
            ids, shard_hashes, base = embeddings.load(emb, space, names[shard])
            rows = unpack(labels.flat[flat])[1]
            scores.flat[flat] = rescorer.scores(base, flat // labels.shape[1], rows)
            ordinals.flat[flat] = self._ordinals(space, names[shard], ids)[rows]
            hashes.flat[flat] = shard_hashes[rows]
        order = np.lexsort((ordinals, -scores), axis=1)[:, :width]  # -inf (no candidate) sorts last
        return tuple(np.take_along_axis(a, order, 1) for a in (ordinals, hashes, scores))

    def _base(self, space: str) -> Iterator[tuple[int, np.ndarray]]:
        """The space's float16 vectors, shard by shard, the next one read while this one is searched."""
        emb = self.inputs["embeddings"]
        return prefetch((i, embeddings.load(emb, space, name, ("vectors",))[0]) for i, name in enumerate(embeddings.shards(emb, space)))

    # --- catalog positions ---------------------------------------------------------------------

    def _catalog_index(self, shard: str) -> int:
        if self._catalog_shards is None or shard not in self._catalog_shards:
            self._catalog_shards = {s: i for i, s in enumerate(catalog.shards(self.inputs["catalog"]))}
        return self._catalog_shards[shard]

    def _ordinals(self, space: str, shard: str, ids: np.ndarray) -> np.ndarray:
        """pack(catalog shard index, catalog row) of each embedded id of one shard."""
        catalog_ids = catalog.read(self.inputs["catalog"], shard, ok_only=False, columns=["id"])["id"].combine_chunks()
        rows = pc.index_in(pa.array(ids, pa.string()), value_set=catalog_ids)
        if rows.null_count:
            raise ValueError(f"embeddings/{space}/{shard}: {rows.null_count} ids are not in the catalog; rerun embed")
        return pack(self._catalog_index(shard), rows.to_numpy())

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

    # --- pairs -----------------------------------------------------------------------------------

    def _assemble(self, q: Queries, hits: dict[str, Hits], stats: Stats) -> PairColumns:
        columns = PairColumns(sorted(hits), self.settings.hard_negatives)
        for start in range(0, len(q.ids), ASSEMBLY_CHUNK):
            end = min(start + ASSEMBLY_CHUNK, len(q.ids))
            rows = {sp: (h.ordinal[start:end].tolist(), h.hash[start:end].tolist(), h.score[start:end].tolist()) for sp, h in hits.items()}
            for i in range(start, end):
                found = self._neighbours(int(q.ordinals[i]), rows, i - start)
                qhash = int(q.hashes[i]) if q.has_hash[i] else None
                made = self._pairs_for(q.ids[i], qhash, found, stats)
                for target, in_band, negatives in made:
                    columns.add(i, target, in_band, negatives)
                if not made:
                    stats.reject("no_in_band_neighbour")
        return columns

    @staticmethod
    def _neighbours(query: int, rows: dict[str, tuple[list, list, list]], j: int) -> dict[int, Neighbour]:
        """The union over spaces of one query's neighbours (itself excluded), by catalog ordinal."""
        found: dict[int, Neighbour] = {}
        for space, (ordinals, hashes, scores) in rows.items():
            for ordinal, h, score in zip(ordinals[j], hashes[j], scores[j]):
                if ordinal >= 0 and ordinal != query:
                    found.setdefault(ordinal, Neighbour(ordinal, h, {})).scores[space] = score
        return found

    def _pairs_for(self, qid: str, qhash: int | None, found: dict[int, Neighbour], stats: Stats) -> list[tuple[Neighbour, dict[str, float], list[Neighbour]]]:
        s = self.settings
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
        rng = random.Random(query_rank(s.seed, qid))
        chosen = rng.sample(candidates, min(s.pairs_per_query, len(candidates)))
        chosen.sort(key=lambda c: c[0].ordinal)
        made = []
        for target, in_band in chosen:
            negatives = sorted(
                (n for n in usable if n.ordinal != target.ordinal and n.hash != target.hash),
                key=lambda n: (-max(n.scores.values()), n.ordinal),
            )[: s.hard_negatives]
            if len(negatives) < s.hard_negatives:
                stats.counters["pairs_short_of_hard_negatives"] += 1
            made.append((target, in_band, negatives))
            for sp in in_band:
                stats.counters[f"pairs_found_by.{sp}"] += 1
        stats.counters["queries_with_pairs"] += 1
        return made

    def _pairs_table(self, q: Queries, c: PairColumns) -> pa.Table:
        """`pairs.SCHEMA` rows from the columns; ids are looked up in the catalog only now."""
        n, spaces = len(c), c.spaces
        target_ords, neg_ords = np.asarray(c.target, np.int64), np.asarray(c.negatives, np.int64).reshape(n, c.width)
        has_neg = neg_ords >= 0
        ids = self._ids_of(np.concatenate([target_ords, neg_ords[has_neg]]))
        query_ids = pa.array(q.ids, pa.string()).take(pa.array(np.asarray(c.query, np.int64)))
        target_ids = ids.slice(0, n)
        space_scores = np.asarray(c.space_scores, np.float32).reshape(n, len(spaces))
        in_band = ~np.isnan(space_scores)
        space_names = pa.array(np.array(spaces, dtype=object)[np.nonzero(in_band)[1]].tolist(), pa.string())
        neg_scores = np.asarray(c.negative_scores, np.float32).reshape(n, c.width)
        return pa.Table.from_arrays(
            [
                pa.array([pairs.pair_id(a, b) for a, b in zip(query_ids.to_pylist(), target_ids.to_pylist())], pa.string()),
                query_ids,
                target_ids,
                _lists(in_band.sum(1), [space_names, pa.array(space_scores[in_band])], pairs.SPACE_SCORE),
                _lists(has_neg.sum(1), [ids.slice(n), pa.array(neg_scores[has_neg])], pairs.SCORED_ID),
            ],
            schema=pairs.SCHEMA,
        )

    # --- backends' per-worker state ---------------------------------------------------------------

    def _rescore_device(self) -> str:
        """Exact scores are the same on any device; the GPU when torch has one, since the worker holds it anyway."""
        import torch

        return "cuda" if self.device() == "cuda" and torch.cuda.is_available() else "cpu"

    def _faiss_gpu(self):
        return knn_device.faiss_gpu_resources() if self.device() == "cuda" else None

    def _index_path(self, space: str) -> Path:
        return self.output / "index" / f"{space}.faiss"

    def _loaded_index(self, space: str) -> faiss_index.LoadedIndex:
        """Loaded once per worker and space; reloaded if the file was rebuilt."""
        path = self._index_path(space)
        stamp = path.stat().st_mtime_ns if path.exists() else None
        if space not in self._indexes or self._indexes[space][0] != stamp:
            names = embeddings.shards(self.inputs["embeddings"], space)
            self._indexes[space] = (stamp, faiss_index.LoadedIndex(path, names, self.settings.search_params, self._faiss_gpu()))
        return self._indexes[space][1]

    def _dim(self, space: str) -> int | None:
        """The space's vector width: from its space.json, else from its first non-empty shard (an empty shard
        may be (0, 0), as older embeds wrote it); None when nothing is embedded in the space."""
        emb = self.inputs["embeddings"]
        manifest = embeddings.read_manifest(emb, space) or {}
        if manifest.get("dim"):
            return int(manifest["dim"])
        for name in embeddings.shards(emb, space):
            vectors = embeddings.load(emb, space, name, ("vectors",))[0]
            if len(vectors):
                return int(vectors.shape[1])
        return None


def _by_shard(labels: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(shard index, flat positions in `labels`) for every shard that holds at least one label."""
    flat = np.flatnonzero(labels.ravel() >= 0)
    shard = unpack(labels.ravel()[flat])[0]
    order = np.argsort(shard, kind="stable")
    flat, shard = flat[order], shard[order]
    for part in np.split(np.arange(len(flat)), np.flatnonzero(np.diff(shard)) + 1):
        if len(part):
            yield int(shard[part[0]]), flat[part]


def _lists(counts: np.ndarray, values: list[pa.Array], struct: pa.StructType) -> pa.ListArray:
    """A list<struct> column from per-row counts and the flattened struct fields."""
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    fields = [struct.field(i) for i in range(struct.num_fields)]
    return pa.ListArray.from_arrays(offsets, pa.StructArray.from_arrays(values, fields=fields), type=pa.list_(struct))
