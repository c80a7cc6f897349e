"""faiss indexes built once per space (IVF-Flat, IVF-PQ, HNSW, any factory string), then searched.

Building is a global step: train on a seeded sample drawn across every base shard, add the
shards in order, write the index (and which shard each stored row came from) atomically.
Stored rows get sequential ids; `offsets` (cumulative shard sizes) turn them back into
pack(shard index, row) labels, so any index type works without an IDMap.

Searching loads the index once per worker, memory-mapped where faiss allows it, optionally
clones it to a GPU, and searches query blocks. Scores of lossy indexes (PQ) are approximate;
the mine stage re-scores the candidates exactly (`stages.knn.rescore`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterable

import faiss
import numpy as np

from stages.base import atomic_path
from stages.knn.exact import pack, sort_results

METRIC = faiss.METRIC_INNER_PRODUCT
# Probe dimensions for checking a factory string before the real one is known: between
# them they are divisible by every common PQ/OPQ sub-quantizer count (1-10, 12, 16, 32, 64 ...).
_PROBE_DIMS = (3840, 5040)


def reason(e: Exception) -> str:
    """faiss's own words, without the C++ location prefix."""
    text = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    return text.rsplit("failed: ", 1)[-1] if "failed: " in text else text.rsplit(":", 1)[-1].strip()


def check_factory(index: str, d: int | None = None) -> None:
    """Raise ValueError unless faiss can build `index` (at dimension d, or at some d); callers name the key."""
    if re.search(r"\bIDMap", index):
        raise ValueError(f"{index!r}: leave out IDMap, mine assigns ids itself")
    errors = []
    for dim in (d,) if d else _PROBE_DIMS:
        try:
            faiss.index_factory(dim, index, METRIC)
            return
        except RuntimeError as e:
            errors.append(reason(e))
    where = f" at d={d}" if d else ""
    raise ValueError(f"faiss cannot build {index!r}{where}: {errors[-1]} (e.g. Flat, IVF4096,Flat, IVF4096,PQ64, HNSW32)")


def check_search_params(index: str, params: str) -> None:
    """Raise ValueError unless every parameter applies to `index`; callers name the key."""
    if not params:
        return
    for dim in _PROBE_DIMS:
        try:
            probe = faiss.index_factory(dim, index, METRIC)
            break
        except RuntimeError:
            continue
    else:
        return  # check_factory reports the index itself
    try:
        faiss.ParameterSpace().set_index_parameters(probe, params)
    except RuntimeError as e:
        raise ValueError(f"{params!r} does not apply to index {index!r}: {reason(e)} (IVF: nprobe=64; HNSW: efSearch=128)") from None


def builds_in_parallel_deterministically(index: str) -> bool:
    """Graph indexes (HNSW, NSG) link each added vector to whatever its neighbours are at that
    moment; with several threads that depends on timing, so they are built on one thread."""
    return not re.search(r"HNSW|NSG", index)


def build(
    factory: str,
    d: int,
    shards: Callable[[], Iterable[tuple[int, np.ndarray]]],
    sizes: list[int],
    train_size: int,
    seed: int,
    gpu=None,
) -> faiss.Index:
    """Train `factory` on a seeded sample of the base (if it needs training) and add every shard.

    `shards()` streams (shard index, vectors) in order; `sizes` are the shards' row counts.
    `gpu`: faiss GpuResources to train and add on the GPU (IVF types), else CPU.
    """
    index = faiss.index_factory(d, factory, METRIC)
    if gpu is not None:
        index = _to_gpu(index, gpu, factory)
    if not index.is_trained:
        sample = training_sample(shards(), sizes, train_size, seed)
        try:
            index.train(sample)
        except RuntimeError as e:
            raise ValueError(f"mine.index {factory!r} could not be trained on {len(sample)} vectors (mine.train_size={train_size}, "
                             f"{sum(sizes)} in the space): {reason(e)}") from None  # fmt: skip
    for _, vectors in shards():
        if len(vectors):
            index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return faiss.index_gpu_to_cpu(index) if gpu is not None else index


def training_sample(shards: Iterable[tuple[int, np.ndarray]], sizes: list[int], n: int, seed: int) -> np.ndarray:
    """min(n, total) rows drawn uniformly without replacement (seeded), read shard by shard."""
    total = sum(sizes)
    picked = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    out = []
    for i, vectors in shards:
        lo, hi = np.searchsorted(picked, [offsets[i], offsets[i + 1]])
        if hi > lo:
            out.append(np.asarray(vectors[picked[lo:hi] - offsets[i]], dtype=np.float32))
    return np.ascontiguousarray(np.concatenate(out)) if out else np.zeros((0, 0), np.float32)


def save(index: faiss.Index, path: Path, shard_names: list[str], sizes: list[int], factory: str) -> None:
    """`{path}` (the index) and `{path}.json` (its shards, in order, with their sizes), each written atomically."""
    meta = {"index": factory, "d": index.d, "ntotal": index.ntotal, "shards": shard_names, "sizes": [int(s) for s in sizes]}
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))
    with atomic_path(Path(f"{path}.json")) as tmp:
        tmp.write_text(json.dumps(meta, indent=1) + "\n")


class LoadedIndex:
    """An index read back for searching: labels come back as pack(shard index, row)."""

    def __init__(self, path: Path, shard_names: list[str], search_params: str = "", gpu=None):
        meta_path = Path(f"{path}.json")
        if not Path(path).is_file() or not meta_path.is_file():
            raise FileNotFoundError(f"no index at {path}: its index unit has not run")
        meta = json.loads(meta_path.read_text())
        if meta["shards"] != shard_names:
            raise ValueError(f"{path} was built on other shards than the space now holds; rerun the mine stage from scratch")
        self.offsets = np.concatenate([[0], np.cumsum(meta["sizes"])]).astype(np.int64)
        self.index = _read(path)
        self.on_gpu = gpu is not None
        if self.on_gpu:
            self.index = _to_gpu(self.index, gpu, meta["index"])
        self.set_search_params(search_params)

    def set_search_params(self, params: str) -> None:
        """faiss's own syntax, e.g. nprobe=64 or efSearch=128; empty leaves faiss's defaults."""
        if params:
            space = faiss.GpuParameterSpace() if self.on_gpu else faiss.ParameterSpace()
            space.set_index_parameters(self.index, params)

    def search(self, queries: np.ndarray, k: int, query_block: int = 8192) -> tuple[np.ndarray, np.ndarray]:
        """(scores, labels) [nq, k], sorted by score then label, -1 / -inf where nothing was found."""
        D = np.full((len(queries), k), -np.inf, np.float32)
        L = np.full((len(queries), k), -1, np.int64)
        for s in range(0, len(queries), query_block):  # bounds faiss's per-search buffers
            q = np.ascontiguousarray(queries[s : s + query_block], dtype=np.float32)
            D[s : s + len(q)], L[s : s + len(q)] = self._search(q, k)
        return sort_results(D, L)

    def _search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        D, ids = self.index.search(q, k)
        shard = np.searchsorted(self.offsets, ids, side="right") - 1
        return D, np.where(ids >= 0, pack(shard, ids - self.offsets[np.clip(shard, 0, None)]), -1)


def _read(path: Path) -> faiss.Index:
    """Memory-mapped where the index type allows it (IVF lists, flat codes), so workers share pages."""
    ro = faiss.IO_FLAG_READ_ONLY
    for flags in (faiss.IO_FLAG_MMAP | faiss.IO_FLAG_MMAP_IFC | ro, faiss.IO_FLAG_MMAP | ro, faiss.IO_FLAG_MMAP_IFC | ro):
        try:
            return faiss.read_index(str(path), flags)
        except RuntimeError:
            continue
    return faiss.read_index(str(path))


def _to_gpu(index: faiss.Index, gpu, factory: str) -> faiss.Index:
    options = faiss.GpuClonerOptions()
    options.useFloat16 = "PQ" in factory  # IVF-PQ lookup tables in float16: large M fits in shared memory
    try:
        return faiss.index_cpu_to_gpu(gpu, 0, index, options)
    except RuntimeError as e:
        raise ValueError(f"mine.index {factory!r} has no faiss GPU implementation ({reason(e)}); set mine.device: cpu") from None
