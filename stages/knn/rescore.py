"""Exact scores of chosen (query, base row) pairs, whichever backend found them.

Embeddings are stored as float16. Every float16 value is an integer multiple of 2^-24, so the
product of two is a multiple of 2^-48; while the partial sums stay below 2^5 in magnitude
(vectors of norm up to ~5, and ours are unit vectors) every one fits in float64's 53 bits.
The float64 sum of the products is therefore the exact inner product, in any summation order
and on any device, and rounding it once to float32 gives a score every backend agrees on bit
for bit. Backends only propose candidates (float32 BLAS, float16 tensor cores, PQ codes, a
graph); the band and the final top-k are decided on these scores.
"""

from __future__ import annotations

import numpy as np
import torch


class Rescorer:
    """Exact scores for one set of queries, held on `device` while a base is streamed past them."""

    def __init__(self, queries: np.ndarray, device: str = "cpu", chunk: int = 16384):
        self.device = torch.device(device)
        self.queries = torch.from_numpy(np.ascontiguousarray(queries)).to(self.device)
        self.chunk = chunk  # bounds the gathered float64 rows to chunk x d x 16 bytes

    def scores(self, base: np.ndarray, query_index: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """float32 of the exact inner product of queries[query_index[i]] and base[rows[i]], for every i."""
        out = np.empty(len(rows), dtype=np.float32)
        if len(rows) == 0:
            return out
        b = torch.from_numpy(np.ascontiguousarray(base)).to(self.device)
        qi = torch.from_numpy(np.asarray(query_index, dtype=np.int64)).to(self.device)
        ri = torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(self.device)
        for s in range(0, len(rows), self.chunk):
            q = self.queries[qi[s : s + self.chunk]].double()
            x = b[ri[s : s + self.chunk]].double()
            out[s : s + len(q)] = (q * x).sum(1).float().cpu().numpy()
        return out
