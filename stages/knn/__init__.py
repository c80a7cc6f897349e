"""kNN backends used by the mine stage.

- `exact.exact_search`: faiss "Flat", the base streamed shard by shard into a running heap,
  on CPU (`faiss.knn`) or GPU (`faiss.knn_gpu`, faiss-gpu).
- `torch_exact.TorchExact`: tiled matmul with a running top-k kept on a torch device.
- `faiss_index`: any other faiss index factory string (IVF-Flat, IVF-PQ, HNSW, ...), built once
  per space from a seeded training sample, then loaded (memory-mapped) by every query unit.
- `rescore.Rescorer`: the exact float32 score of a (query, base row) pair from the stored
  float16 vectors; backends only propose candidates, the mine stage decides on these scores.
- `stream.prefetch`: the next base shard is read while the current one is searched.

Labels everywhere are pack(shard index, row in shard) (`exact.pack`): no corpus-wide id table.

Peak memory of one mine worker, in bytes (S spaces mined, one after another; nq queries in a
unit, about `queries_per_unit`, at most that plus one catalog shard's; d dimensions;
K = k + 1 + rerank candidates; R rows in the largest base shard; P <= nq x pairs_per_query
pairs; H hard_negatives; qb, bb = query_block, base_block; b = bytes per element of the
torch-exact dtype). None of these grows with the corpus, except the index of an
approximate backend, which is what an index is.

    every backend (host)    nq x d x 2                     query vectors of the space (float16)
                          + nq x K x 28                    candidates: label, exact score, ordinal, hash
                          + S x nq x (k+1) x 20            every space's top k+1, kept until pairs are drawn
                          + 3 x R x d x 2                  the shard being searched, one read ahead, one re-scored
                          + 16384 x d x 16                 re-scoring chunk (float64 pairs of rows)
                          + P x (16 + 4 S + 12 H) + P x ~(70 + 30 H)   pairs as ordinals, then as the written table
    faiss Flat            + nq x K x 12                    running heap
                          + (qb + R) x d x 4               float32 copies of a query block and of the shard
                          + qb x K x 12                    one block's results (faiss tiles its own scores)
    torch-exact (device)    nq x d x b + nq x K x 12       queries and running top-k, resident
                          + bb x (d x b + 8)               one base block and its labels
                          + qb x bb x b                    one tile of scores (plus topk's small outputs)
                (host)    + 4 x bb x d x 2                 blocks packed ahead (pinned on a GPU machine)
    faiss index             each space's index, kept by the worker across units: memory-mapped
                            on CPU where faiss allows it (IVF lists, flat codes), so workers on
                            one node share the page cache; on a GPU, a copy on the device:
                            IVF-Flat  N x (4 d + 8) + nlist x 4 d
                            IVF-PQm   N x (m + 8) + nlist x 4 d
                            HNSWm     N x (4 d + ~8.5 m)
                          + qb x K x 12 per search block
      index build unit      the whole index + train_size x d x 4 (the training sample)

For the megapairs shape (nq = 1M, d = 768, k = 32, rerank = 8, S = 3, 10k-row shards,
torch-exact float16, qb = 8192, bb = 65536): host about 1.5 + 1.1 + 2.0 + 0.05 + 0.2 + 0.5 + 0.4
GB, under 6 GB; device 1.5 + 0.5 + 0.1 + 1.1 GB, about 3.2 GB. On a CPU, torch-exact computes in
float32 (b = 4, a device copy of the queries is nq x d x 4) with bb = 4096 by default.
"""

from collections.abc import Iterable
from importlib import metadata

# Wheels that each install the same top-level `faiss` package: two of them overwrite each other's files.
FAISS_WHEELS = ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu11", "faiss-gpu-cu12")


def faiss_wheel_conflict(installed: Iterable[str]) -> str | None:
    """What is wrong when more than one faiss wheel is installed (names as pip lists them), else None."""
    found = sorted({n.lower() for n in installed} & set(FAISS_WHEELS))
    if len(found) < 2:
        return None
    return (f"{' and '.join(found)} are installed together; each writes the same `faiss` package, so it may be broken: "
            f"pip uninstall -y {' '.join(found)}, then install megasynth[cpu] or megasynth[gpu] (one of them)")  # fmt: skip


# Before anything imports faiss: a mixed install fails here with what to do, not later with a missing symbol.
def _installed(names: Iterable[str]) -> Iterable[str]:
    for name in names:
        try:
            metadata.distribution(name)
            yield name
        except metadata.PackageNotFoundError:
            pass


_conflict = faiss_wheel_conflict(_installed(FAISS_WHEELS))
if _conflict:
    raise ImportError(_conflict)
