"""Units sized by work: ranges of rows across the files a stage reads, whatever their layout.

A stage that reads parquet files written by the stage above (catalog shards, pairs,
annotations) cuts them into units of about `per_unit` rows each. A unit is a list of
`(file stem, start, stop)` slices, in file order, so a unit may span several small files
and a large file may feed several units. Row counts come from parquet footers: planning
reads metadata, never rows, and the driver holds one small tuple per slice.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

Slice = tuple[str, int, int]  # (file stem, first row, one past the last row)


def row_counts(folder: Path, stems: Iterable[str]) -> list[tuple[str, int]]:
    """(stem, rows) of `folder/{stem}.parquet`, from each file's footer."""
    return [(s, pq.read_metadata(Path(folder) / f"{s}.parquet").num_rows) for s in stems]


def slice_rows(counts: list[tuple[str, int]], per_unit: int) -> list[list[Slice]]:
    """Cut files of the given row counts into units of `per_unit` rows (the last may be smaller)."""
    if per_unit <= 0:
        raise ValueError("per_unit must be positive")
    units: list[list[Slice]] = []
    current: list[Slice] = []
    room = per_unit
    for stem, n in counts:
        start = 0
        while start < n:
            take = min(room, n - start)
            current.append((stem, start, start + take))
            start += take
            room -= take
            if room == 0:
                units.append(current)
                current, room = [], per_unit
    if current:
        units.append(current)
    return units


def rows_per_unit(per_unit: int, fraction: float) -> int:
    """Input rows a unit takes so that about `per_unit` of them pass a filter keeping `fraction`."""
    return max(1, math.ceil(per_unit / max(fraction, 1e-12)))


def unit_rows(slices: list[Slice]) -> int:
    return sum(stop - start for _, start, stop in slices)


def read_slice(path: Path, start: int, stop: int, columns: list[str] | None = None) -> pa.Table:
    """Rows [start, stop) of one parquet file, reading only the row groups they fall in."""
    f = pq.ParquetFile(path)
    groups, first, offset = [], None, 0
    for g in range(f.metadata.num_row_groups):
        n = f.metadata.row_group(g).num_rows
        if offset + n > start and offset < stop:
            groups.append(g)
            if first is None:
                first = offset
        offset += n
    if not groups:
        return f.schema_arrow.empty_table().select(columns) if columns else f.schema_arrow.empty_table()
    table = f.read_row_groups(groups, columns=columns)
    return table.slice(start - first, stop - start)


def read_slices(folder: Path, slices: list[Slice], columns: list[str] | None = None) -> pa.Table:
    """A unit's rows from every slice, in order, as one table."""
    parts = [read_slice(Path(folder) / f"{stem}.parquet", start, stop, columns) for stem, start, stop in slices]
    return pa.concat_tables(parts) if parts else pa.table({})
