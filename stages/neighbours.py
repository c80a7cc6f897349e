"""Neighbour lists on disk, written by search and read by mine: `{unit}.parquet` per query unit.

One row per query, in catalog order: `query_id`, `query_ordinal` (pack(catalog shard index,
catalog row)), `query_hash` (first 64 bits of its image's sha256, 0 when no space embedded
it), `query_rank` (its seeded sample rank), and for every searched space three fixed-width
lists of the top `k + 1` neighbours by exact score then catalog position: `{space}.ordinal`
(-1 where none), `{space}.hash` and `{space}.score`. The query usually finds itself first.

Also here: what search and mine share about which images take part. Queries are sampled
and the corpus is scaled by thresholds on stable 64-bit hashes of the catalog id, so a
smaller sample is always inside a larger one with the same seed (25% inside 50% inside
100%), whatever the sharding.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, field_validator

from stages.base import StageSettings, atomic_path

FULL = 2**64  # a threshold that keeps every image


class MiningScope(StageSettings):
    """Settings search and mine share: which spaces, how deep, which queries, which part of the corpus."""

    spaces: list[str] | None = Field(None, description="spaces to mine; default: every embedded space")
    k: int = Field(32, gt=0, description="neighbours retrieved per query and space")
    queries: int | float | None = Field(
        None, description="all images (null), a fraction in (0, 1], or about this many (a count becomes the fraction it is "
        "of the mined corpus); a smaller sample is always inside a larger one with the same seed")  # fmt: skip
    corpus_fraction: float = Field(1.0, gt=0, le=1, description="mine within this share of the corpus, chosen by a stable hash of "
                                   "the image id (the same images for any seed; a smaller share inside a larger one)")  # fmt: skip
    seed: int | None = None
    cpus: float = Field(1.0, gt=0)

    @field_validator("queries")
    @classmethod
    def _queries(cls, v):
        if isinstance(v, float) and not 0 < v <= 1:
            raise ValueError("a fraction of queries must be in (0, 1]; use an integer for a count")
        if isinstance(v, int) and v <= 0:
            raise ValueError("the number of queries must be positive")
        return v


def hash64(text: str) -> int:
    """A stable 64-bit hash of a string (ids, seeds): the same on every machine and in every run."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


def query_rank(seed: int | None, id_: str) -> int:
    """A seeded pseudo-random rank per image, independent of sharding: queries are the lowest ranks."""
    return hash64(f"{seed or 0}:{id_}")


def corpus_rank(id_: str) -> int:
    """A rank per image for corpus-scale variants: the same for every seed and every run."""
    return hash64(f"corpus:{id_}")


def threshold(fraction: float) -> int:
    """Ranks below this are kept: `fraction` of all 64-bit ranks."""
    return FULL if fraction >= 1 else int(fraction * FULL)


def query_threshold(queries: int | float | None, corpus_images: int) -> int:
    """The query rank threshold for `mine.queries` over a mined corpus of `corpus_images` images."""
    if queries is None:
        return FULL
    if isinstance(queries, float):
        return threshold(queries)
    return threshold(queries / corpus_images) if corpus_images else FULL


def in_corpus(ids: list[str], fraction: float) -> np.ndarray:
    """Which of `ids` are in the mined corpus."""
    if fraction >= 1:
        return np.ones(len(ids), bool)
    t = threshold(fraction)
    return np.fromiter((corpus_rank(i) < t for i in ids), bool, count=len(ids))


def columns(space: str) -> tuple[str, str, str]:
    return f"{space}.ordinal", f"{space}.hash", f"{space}.score"


def units(folder: Path) -> list[str]:
    return sorted(p.stem for p in Path(folder).glob("*.parquet") if not p.name.startswith("."))


def write(path: Path, query_ids: list[str], ordinals: np.ndarray, hashes: np.ndarray, ranks: np.ndarray,
          hits: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:  # fmt: skip
    """One unit's neighbour lists; `hits[space]` = (ordinals int64, hashes uint64, scores float32), each [nq, k+1]."""
    arrays = [pa.array(query_ids, pa.string()), pa.array(ordinals, pa.int64()), pa.array(hashes, pa.uint64()), pa.array(ranks, pa.uint64())]
    names = ["query_id", "query_ordinal", "query_hash", "query_rank"]
    for space in sorted(hits):
        for name, a, t in zip(columns(space), hits[space], (pa.int64(), pa.uint64(), pa.float32())):
            width = a.shape[1]
            arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(a.ravel(), t), width))
            names.append(name)
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_arrays(arrays, names=names), tmp, compression="zstd")


def read(path: Path, spaces: list[str], width: int) -> tuple[pa.Table, dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """The query columns, and each space's first `width` neighbours as [nq, width] arrays."""
    table = pq.read_table(path)
    hits = {}
    for space in spaces:
        parts = []
        for name, dtype in zip(columns(space), (np.int64, np.uint64, np.float32)):
            col = table[name].combine_chunks()
            stored = col.type.list_size
            flat = col.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape(len(col), stored)
            parts.append(flat[:, :width])
        hits[space] = tuple(parts)
    return table.select(["query_id", "query_ordinal", "query_hash", "query_rank"]), hits


def searched(path: Path) -> tuple[list[str], int]:
    """The spaces a neighbours file holds and how many neighbours per query (k + 1)."""
    schema = pq.read_schema(path)
    spaces = sorted(n[: -len(".ordinal")] for n in schema.names if n.endswith(".ordinal"))
    return spaces, (schema.field(f"{spaces[0]}.ordinal").type.list_size if spaces else 0)
