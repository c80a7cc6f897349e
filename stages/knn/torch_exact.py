"""torch-exact: exact inner-product top-k by tiled matmul on a torch device (GPU, or CPU).

The queries stay on the device for the whole search, beside a running top-k per query. The
base streams past them in blocks of `base_block` rows (small shards are packed into one
block; on a GPU, a background thread packs and pins the next block while this one computes, and
the copy to the device is an asynchronous DMA). For each query block x
base block tile: one matmul in the compute dtype, the tile's top-k, and a merge into the
running top-k. A tile's scores never leave the device; only the final k scores and labels per
query come back to the host.

Ties and rounding: the tile top-k keeps whichever of equal scores torch returns, and float16
scores are rounded, so callers ask for a few more than they keep and re-score them exactly
(`stages.knn.rescore`); that is what makes this backend agree with faiss bit for bit.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import torch

from stages.knn.exact import pack, sort_results
from stages.knn.stream import prefetch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Base rows per block: wide on a GPU (large matmuls keep tensor cores busy; an 8192 x 65536 float16
# score tile is 1 GiB), narrow on a CPU (an 8192 x 4096 float32 tile is 128 MiB).
BASE_BLOCK = {"cuda": 65536, "cpu": 4096}


def compute_dtype(setting: str, device: str) -> torch.dtype:
    """auto: float32 on CPU; float16 on a GPU, where it runs on tensor cores and loses nothing
    on embeddings that are stored as float16 (bfloat16 would drop 3 mantissa bits)."""
    if setting == "auto":
        return torch.float16 if device == "cuda" else torch.float32
    return DTYPES[setting]


class TorchExact:
    def __init__(self, device: str = "cpu", dtype: torch.dtype = torch.float32, query_block: int = 8192, base_block: int | None = None):
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("mine.device=cuda but torch sees no CUDA device on this worker; set mine.device: cpu or auto")
        self.dtype = dtype
        self.query_block = query_block
        self.base_block = base_block or BASE_BLOCK[self.device.type]

    @torch.inference_mode()
    def search(self, queries: np.ndarray | torch.Tensor, base: Iterable[tuple[int, np.ndarray | torch.Tensor]], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product of `queries` against every (shard_index, vectors) of `base`.

        Same contract as `exact.exact_search`: (scores, labels) [nq, k], score descending then
        label, label = pack(shard_index, row), -1 / -inf where the base has fewer than k rows.
        """
        nq = len(queries)
        if nq == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        q = self._on_device(torch.as_tensor(queries))  # resident for the whole search
        best_d = torch.full((nq, k), -torch.inf, dtype=torch.float32, device=self.device)
        best_l = torch.full((nq, k), -1, dtype=torch.int64, device=self.device)
        for block, labels in prefetch(self._staged(base), depth=2):  # the next block is packed and pinned while this one computes
            self._merge_block(q, self._on_device(block), labels.to(self.device, non_blocking=True), best_d, best_l)
        return sort_results(best_d.cpu().numpy(), best_l.cpu().numpy())

    def _merge_block(self, q: torch.Tensor, block: torch.Tensor, labels: torch.Tensor, best_d: torch.Tensor, best_l: torch.Tensor) -> None:
        k = best_d.shape[1]
        kk = min(k, len(block))
        for s in range(0, len(q), self.query_block):
            e = min(s + self.query_block, len(q))
            scores = q[s:e] @ block.T  # [query_block, base_block] in the compute dtype (cuBLAS accumulates half types in float32)
            d, i = torch.topk(scores, kk, dim=1, sorted=False)
            cand_d = torch.cat([best_d[s:e], d.float()], 1)
            cand_l = torch.cat([best_l[s:e], labels[i]], 1)
            top_d, j = torch.topk(cand_d, k, dim=1, sorted=False)
            best_d[s:e] = top_d
            best_l[s:e] = torch.gather(cand_l, 1, j)

    def _blocks(self, base: Iterable[tuple[int, np.ndarray | torch.Tensor]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Base rows regrouped into blocks of `base_block` rows, with their packed labels."""
        parts, labels, n = [], [], 0
        for shard_index, vectors in base:
            vectors = torch.as_tensor(vectors)
            start = 0
            while start < len(vectors):
                take = min(self.base_block - n, len(vectors) - start)
                parts.append(vectors[start : start + take])
                labels.append(torch.from_numpy(pack(shard_index, np.arange(start, start + take))))
                n, start = n + take, start + take
                if n == self.base_block:
                    yield _cat(parts), torch.cat(labels)
                    parts, labels, n = [], [], 0
        if n:
            yield _cat(parts), torch.cat(labels)

    def _staged(self, base) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Blocks ready to copy: host blocks bound for a GPU go to pinned memory, so the copy is an asynchronous DMA."""
        for block, labels in self._blocks(base):
            if self.device.type == "cuda" and block.device.type == "cpu":
                block, labels = block.pin_memory(), labels.pin_memory()
            yield block, labels

    def _on_device(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=True).to(self.dtype)


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)
