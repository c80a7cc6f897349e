"""Exact inner-product top-k over a base stored in shards, with bounded memory (faiss "Flat").

The base is streamed shard by shard; each shard's exact top-k (faiss, on CPU or GPU) is
merged into a running heap. Labels pack (shard index, row in shard) into one int64, so no
global id table is ever built.
"""

from __future__ import annotations

from typing import Iterable

import faiss
import numpy as np

SHARD_SHIFT = 32


def pack(shard_index: int | np.ndarray, rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows)
    return np.where(rows >= 0, (np.asarray(shard_index, dtype=np.int64) << SHARD_SHIFT) | rows.astype(np.int64), -1)


def unpack(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return labels >> SHARD_SHIFT, labels & ((1 << SHARD_SHIFT) - 1)


def exact_search(
    queries: np.ndarray, base: Iterable[tuple[int, np.ndarray]], k: int, query_block: int = 8192, gpu=None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by inner product of `queries` against every (shard_index, vectors) of `base`.

    `gpu`: faiss GpuResources to compute each shard's top-k on the GPU (faiss-gpu), else CPU.
    Returns (scores, labels), each [nq, k], sorted by score descending then label; missing
    results (a base smaller than k) have label -1 and score -inf.
    """
    nq = len(queries)
    heap = faiss.ResultHeap(nq, k, keep_max=True)
    for shard_index, vectors in base:
        if len(vectors) == 0 or nq == 0:
            continue
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        kk = min(k, len(vectors))
        for s in range(0, nq, query_block):  # bounds the score block to query_block x shard rows
            q = np.ascontiguousarray(queries[s : s + query_block], dtype=np.float32)
            D, I = _knn(q, vectors, kk, gpu)
            heap.add_result_subset(np.arange(s, s + len(q)), D, pack(shard_index, I))
    heap.finalize()
    return sort_results(heap.D, heap.I)


def _knn(q: np.ndarray, x: np.ndarray, k: int, gpu) -> tuple[np.ndarray, np.ndarray]:
    if gpu is None:
        return faiss.knn(q, x, k, metric=faiss.METRIC_INNER_PRODUCT)
    return faiss.knn_gpu(gpu, q, x, k, metric=faiss.METRIC_INNER_PRODUCT)


def sort_results(D: np.ndarray, I: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order each row by score descending, ties by label, so results never depend on merge order."""
    D = np.where(I < 0, -np.inf, D).astype(np.float32)
    order = np.lexsort((I, -D), axis=-1) if D.size else np.zeros(D.shape, dtype=np.int64)
    return np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)
