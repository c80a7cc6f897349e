"""Mined pairs on disk, written by mine: one parquet file per query unit.

A row is one (query, target) pair with every space that found the target in band and its
score there, and the query's hard negatives for this target, hardest first.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# A hard negative: `score` is its similarity in `space`, the space where it scores highest.
SCORED_ID = pa.struct([("id", pa.string()), ("score", pa.float32()), ("space", pa.string())])
SPACE_SCORE = pa.struct([("space", pa.string()), ("score", pa.float32())])
SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("query_id", pa.string()),
        ("target_id", pa.string()),
        ("spaces", pa.list_(SPACE_SCORE)),
        ("hard_negatives", pa.list_(SCORED_ID)),
    ]
)


ROW_GROUP = 4096  # rows per parquet row group: annotate reads its slice of a file by row groups


def pair_id(query_id: str, target_id: str) -> str:
    """Stable, file-name safe, independent of sharding: used as the triplet's key downstream."""
    return hashlib.sha1(f"{query_id}\t{target_id}".encode()).hexdigest()[:20]


def units(folder: Path) -> list[str]:
    return sorted(p.stem for p in Path(folder).glob("*.parquet") if not p.name.startswith("."))


def write(path: Path, rows: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path, compression="zstd", row_group_size=ROW_GROUP)


def read(folder: Path, unit: str) -> list[dict]:
    return pq.read_table(Path(folder) / f"{unit}.parquet").to_pylist()
