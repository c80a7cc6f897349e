"""search: every query's nearest neighbours in every embedding space, kept as lists.

The costly half of mining, done once: `mine` then chooses pairs from these lists, so a new
band, pairs per query or number of hard negatives redoes only that choice, in seconds. A
search also stands in for any smaller one: fewer spaces, a smaller k, a smaller query sample
(see `scope` and `covers`).

Backends (`mine.backend`, see `stages.knn`): faiss with any index factory string -- `Flat`
streams the base shard by shard, exactly; IVF, PQ, HNSW ... are built once per space by an
`index-{space}` unit in a first wave and searched by every query unit -- or `torch-exact`, a
tiled matmul with a running top-k on a GPU (or the CPU). Every backend proposes
k+1+`rerank` candidates per query; their scores are then recomputed exactly from the stored
float16 vectors (`stages.knn.rescore`) and the top k+1 are kept in order of exact score then
catalog position, so exact backends give identical lists, and rounding (float16, PQ) cannot
move a neighbour across a band edge later.

Only the images `select` chose take part (`stages.selection`; all of them when it was given no
query): they alone are indexed and searched for, so every neighbour is one of them too.

Units are ranges of catalog rows holding about `queries_per_unit` queries each, whatever the
shard sizes. Neighbours are identified by their catalog position (shard, row), never by a
corpus-wide table, so a worker's memory is bounded by its unit and one base shard, not by the
corpus (formulas in `stages.knn`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, ValidationInfo, field_validator

from stages import catalog, embeddings, neighbours, selection, units
from stages.base import Resources, Stage, Stats, Unit
from stages.knn import device as knn_device
from stages.knn import faiss_index
from stages.knn.exact import exact_search, pack, unpack
from stages.knn.rescore import Rescorer
from stages.knn.stream import prefetch


class SearchSettings(neighbours.MiningScope):
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
    queries_per_unit: int = Field(100_000, gt=0, description="queries per search unit: several units per GPU keep every GPU busy")
    query_block: int = Field(8192, gt=0, description="queries per search block (both backends)")
    base_block: int | None = Field(None, gt=0, description="torch-exact: base rows per block; default 65536 on cuda, 4096 on cpu")
    gpus: float | None = Field(None, ge=0, description="per worker; default 1 when the device is cuda")

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


# What the lists hold is decided by these; the rest only changes speed or layout.
SCOPE_FIELDS = ("spaces", "k", "queries")
SPEED_FIELDS = ("cpus", "gpus", "queries_per_unit")


class SearchStage(Stage):
    name = "search"
    Settings = SearchSettings
    settings: SearchSettings
    version = "1"
    # A worker keeps its device, its thread settings and any loaded index across units.
    loads_model = True

    def __init__(self, settings: SearchSettings, inputs: dict[str, Path], output: Path):
        super().__init__(settings, inputs, output)
        self._indexes: dict[str, tuple] = {}  # space -> (file mtime, loaded index): loaded once per worker
        self._catalog_shards: dict[str, int] | None = None
        self._kept: dict[tuple[str, str], np.ndarray] = {}  # (space, shard) -> rows in the mined corpus
        self._everything: bool | None = None  # whether select chose every image

    def resources(self) -> Resources:
        return Resources.of(self.settings.cpus, self.settings.gpus, self.device() == "cuda")

    def device(self) -> str:
        return knn_device.resolve(self.settings.device, self.settings.backend)

    def builds_index(self) -> bool:
        return self.settings.backend == "faiss" and self.settings.index != "Flat"

    # --- what a finished search holds --------------------------------------------------------

    def reuse_key(self) -> dict[str, Any]:
        return self.settings.model_dump(mode="json", exclude={*SCOPE_FIELDS, *SPEED_FIELDS})

    def scope(self) -> dict[str, Any]:
        return {"spaces": self.searched_spaces(), "k": self.settings.k, "query_threshold": self.query_threshold()}

    def covers(self, done: dict[str, Any], wanted: dict[str, Any]) -> bool:
        return (set(wanted["spaces"]) <= set(done["spaces"]) and wanted["k"] <= done["k"]
                and wanted["query_threshold"] <= done["query_threshold"])  # fmt: skip

    def searched_spaces(self) -> list[str]:
        available = embeddings.spaces(self.inputs["embeddings"])
        wanted = self.settings.spaces or available
        missing = [s for s in wanted if s not in available]
        if missing:
            raise ValueError(f"mine.spaces: {missing} were not embedded (embedded: {available})")
        return sorted(wanted)

    def query_threshold(self) -> int:
        """Queries are the images ranked below this (about `mine.queries` of the mined corpus)."""
        q = self.settings.queries
        if isinstance(q, int):
            corpus = selection.images(self.inputs["catalog"], self.inputs.get("selection")) * self.settings.corpus_fraction
            return neighbours.query_threshold(q, round(corpus))
        return neighbours.query_threshold(q, 0)

    # --- planning --------------------------------------------------------------------------

    def plan(self) -> list[list[Unit]]:
        spaces = self.searched_spaces()  # fail before any unit runs
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
        s = self.settings
        t = self.query_threshold()
        share = (t / neighbours.FULL) * s.corpus_fraction * self._selected_share()
        counts = units.row_counts(self.inputs["catalog"], catalog.shards(self.inputs["catalog"]))
        sliced = units.slice_rows(counts, units.rows_per_unit(s.queries_per_unit, share))
        return [Unit(f"queries-{i:05d}", {"slices": sl, "threshold": t}, items=round(units.unit_rows(sl) * share))
                for i, sl in enumerate(sliced)]  # fmt: skip

    def _selected_share(self) -> float:
        """The share of accepted images select chose (1 when it chose every image)."""
        if self._selects_all():
            return 1.0
        accepted = selection.images(self.inputs["catalog"], None)
        return selection.images(self.inputs["catalog"], self.inputs["selection"]) / accepted if accepted else 0.0

    def _selects_all(self) -> bool:
        if self._everything is None:
            self._everything = selection.everything(self.inputs.get("selection"))
        return self._everything

    def _filtered(self) -> bool:
        """Whether some embedded images stay out: a corpus fraction, or a selection."""
        return self.settings.corpus_fraction < 1 or not self._selects_all()

    # --- units -----------------------------------------------------------------------------

    def setup(self) -> None:
        self._threads()

    def process(self, unit: Unit) -> Stats:
        self._threads()
        if unit.id.startswith("index-"):
            return self._build_index(unit.payload["space"])
        return self._search_unit(unit)

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
        sizes = [len(self._kept_rows(space, n)) for n in names]
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

    def _search_unit(self, unit: Unit) -> Stats:
        ids, ordinals, ranks = self._unit_queries(unit.payload["slices"], unit.payload["threshold"])
        stats = Stats(input=len(ids), output=len(ids))
        hashes = np.zeros(len(ids), np.uint64)
        hits = {}
        for space in self.searched_spaces():
            hits[space] = self._space_hits(space, unit.payload["slices"], ids, hashes)
            stats.counters[f"searched.{space}"] += int((hits[space][0][:, 0] >= 0).sum())
            self.advance(len(ids) // max(1, len(self.searched_spaces())))
        neighbours.write(self.output / f"{unit.id}.parquet", ids, ordinals, hashes, ranks, hits)
        return stats

    def _unit_queries(self, slices: list, threshold: int) -> tuple[list[str], np.ndarray, np.ndarray]:
        """The unit's queries in catalog order: ok, in the mined corpus, and ranked below the threshold."""
        ids, ordinals, ranks = [], [], []
        for shard, start, stop in slices:
            t = units.read_slice(catalog.catalog_file(self.inputs["catalog"], shard), start, stop, ["id", "status"])
            shard_ids = t["id"].to_pylist()
            ok = np.asarray(pc.equal(t["status"], catalog.OK).fill_null(False)) & neighbours.in_corpus(shard_ids, self.settings.corpus_fraction)
            if not self._selects_all():
                ok &= selection.selected(t["id"].combine_chunks(), selection.ids(self.inputs["selection"], shard))
            rows, found = [], []
            for row in np.flatnonzero(ok):
                rank = neighbours.query_rank(self.settings.seed, shard_ids[row])
                if rank < threshold:
                    rows.append(row)
                    found.append(rank)
            ids += [shard_ids[r] for r in rows]
            ordinals.append(pack(self._catalog_index(shard), start + np.array(rows, np.int64)))
            ranks.append(np.array(found, np.uint64))
        if not ids:
            return [], np.zeros(0, np.int64), np.zeros(0, np.uint64)
        return ids, np.concatenate(ordinals), np.concatenate(ranks)

    # --- search: candidates from the backend, then exact scores --------------------------------

    def _space_hits(self, space: str, slices: list, ids: list[str], hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This space's top k+1 per query (rows aligned with `ids`); fills `hashes` of the queries it embedded."""
        width = self.settings.k + 1  # +1: the query finds itself
        out = (np.full((len(ids), width), -1, np.int64), np.zeros((len(ids), width), np.uint64), np.full((len(ids), width), -np.inf, np.float32))
        pos, vectors = self._query_vectors(space, slices, ids, hashes)
        if len(pos):
            labels = self._search(space, vectors, width + self.settings.rerank)
            for a, b in zip(out, self._exact_top(space, vectors, labels, width)):
                a[pos] = b
        return out

    def _query_vectors(self, space: str, slices: list, ids: list[str], hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """This space's float16 vectors of the unit's queries, and which query each row is."""
        index_of = {i: n for n, i in enumerate(ids)}
        pos, vecs = [], []
        for shard in dict.fromkeys(s for s, _, _ in slices):
            if not embeddings.space_file(self.inputs["embeddings"], space, shard).exists():
                continue
            shard_ids, shard_hashes, v = embeddings.load(self.inputs["embeddings"], space, shard)
            rows = np.array([r for r, i in enumerate(shard_ids.tolist()) if i in index_of], dtype=np.int64)
            if len(rows) == 0:  # also skips an empty shard whose file (older embed) has shape (0, 0)
                continue
            p = np.array([index_of[i] for i in shard_ids[rows].tolist()], dtype=np.int64)
            hashes[p] = shard_hashes[rows]
            pos.append(p)
            vecs.append(v[rows])
        if not vecs:
            return np.zeros(0, np.int64), np.zeros((0, 1), np.float16)
        return np.concatenate(pos), np.concatenate(vecs)

    def _search(self, space: str, vectors: np.ndarray, k: int) -> np.ndarray:
        """Labels pack(space shard index, row) of each query's top-k candidates under the backend's own scores."""
        s = self.settings
        if self.builds_index():
            labels = self._loaded_index(space).search(vectors, k, s.query_block)[1]
        elif s.backend == "torch-exact":
            from stages.knn.torch_exact import TorchExact, compute_dtype

            device = self.device()
            labels = TorchExact(device, compute_dtype(s.dtype, device), s.query_block, s.base_block).search(vectors, self._base(space), k)[1]
        else:
            labels = exact_search(vectors, self._base(space), k, s.query_block, gpu=self._faiss_gpu())[1]
        return self._unfiltered(space, labels)

    def _unfiltered(self, space: str, labels: np.ndarray) -> np.ndarray:
        """Labels into the shards as stored, from labels into the mined corpus's rows of them."""
        if not self._filtered():
            return labels
        names = embeddings.shards(self.inputs["embeddings"], space)
        out = labels.copy()
        valid = labels >= 0
        shard, rows = unpack(labels[valid])
        stored = np.empty_like(rows)
        for i in np.unique(shard):
            at = shard == i
            stored[at] = self._kept_rows(space, names[i])[rows[at]]
        out[valid] = pack(shard, stored)
        return out

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
        """The mined corpus's float16 vectors of the space, shard by shard, the next one read while this one is searched."""
        emb = self.inputs["embeddings"]
        filtered, dim = self._filtered(), self._dim(space) or 1

        def shards():
            for i, name in enumerate(embeddings.shards(emb, space)):
                if not filtered:
                    yield i, embeddings.load(emb, space, name, ("vectors",))[0]
                elif len(kept := self._kept_rows(space, name)):
                    yield i, embeddings.load(emb, space, name, ("vectors",))[0][kept]
                else:  # nothing of this shard takes part: its vectors are never read
                    yield i, np.zeros((0, dim), np.float16)

        return prefetch(shards())

    def _kept_rows(self, space: str, shard: str) -> np.ndarray:
        """Rows of one embeddings shard inside the mined corpus (its corpus fraction, its selection); kept per worker."""
        key = (space, shard)
        if key not in self._kept:
            chosen = None if self._selects_all() else selection.ids(self.inputs["selection"], shard)
            if chosen is not None and len(chosen) == 0:
                self._kept[key] = np.zeros(0, np.int64)  # nothing selected here: the shard's ids are never read
                return self._kept[key]
            ids = embeddings.load(self.inputs["embeddings"], space, shard, ("ids",))[0].tolist()
            keep = neighbours.in_corpus(ids, self.settings.corpus_fraction)
            if chosen is not None:
                keep &= selection.selected(ids, chosen)
            self._kept[key] = np.flatnonzero(keep)
        return self._kept[key]

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
