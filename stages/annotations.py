"""Annotated pairs on disk, written by annotate: one parquet file per pairs unit.

Every mined pair has a row: `status` "ok" with its description and instructions, or
"rejected" with the reason, so nothing is lost silently. Rows carry the pair's provenance
(spaces, hard negatives) so the writer needs nothing else but the catalog.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from stages.pairs import SCHEMA as PAIR_SCHEMA

SCHEMA = pa.schema(
    list(PAIR_SCHEMA)
    + [
        ("status", pa.string()),
        ("error", pa.string()),
        ("description", pa.string()),
        ("instructions", pa.list_(pa.string())),
        ("word_num", pa.int32()),
        ("seed", pa.int64()),
        ("describe_attempts", pa.int32()),
        ("instruct_attempts", pa.int32()),
        ("describer", pa.string()),
        ("describer_kind", pa.string()),  # "vision" (shown both images) or "text" (captions and attributes only)
        ("instructor", pa.string()),
        ("describe_prompt", pa.string()),
        ("instruct_prompt", pa.string()),
    ]
)

OK = "ok"
REJECTED = "rejected"


def units(folder: Path) -> list[str]:
    return sorted(p.stem for p in Path(folder).glob("*.parquet") if not p.name.startswith("."))


ROW_GROUP = 4096  # write reads its slice of a file by row groups


def write(path: Path, rows: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path, compression="zstd", row_group_size=ROW_GROUP)


def read(folder: Path, unit: str, ok_only: bool = True) -> list[dict]:
    rows = pq.read_table(Path(folder) / f"{unit}.parquet").to_pylist()
    return [r for r in rows if r["status"] == OK] if ok_only else rows
