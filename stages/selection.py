"""The selection on disk, written by select and read by search and mine: which images a run mines.

`selection.json`: `{"everything": true}` when no query was given (every image takes part), else
the queries as scored (`name`, `space`, `top_n` or `threshold`, the `cutoff` a top-N ended at) and
how many images each `selected`. Then one `{shard}.parquet` per catalog shard: the `id` of each
selected image in catalog order, the `queries` that selected it and its `scores` under them.
Search and mine read one shard's ids at a time, so no worker holds the ids of the whole selection.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages import catalog
from stages.base import write_bytes_atomic

MANIFEST = "selection.json"
EVERYTHING = {"everything": True, "queries": []}
SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # the catalog id
        ("queries", pa.list_(pa.string())),  # names of the queries that selected it
        ("scores", pa.list_(pa.float32())),  # its score under each of them, aligned with `queries`
    ]
)


def shard_file(folder: Path, shard: str) -> Path:
    return Path(folder) / f"{shard}.parquet"


def write_manifest(folder: Path, manifest: dict) -> None:
    write_bytes_atomic(Path(folder) / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no selection here; run the select stage first")
    return json.loads(path.read_text())


def everything(folder: Path | None) -> bool:
    """Whether every image takes part: no selection folder given (a stage built by hand), or no query."""
    return folder is None or bool(read_manifest(folder)["everything"])


def write(path: Path, rows: dict[str, list]) -> None:
    pq.write_table(pa.table(rows, schema=SCHEMA), path, compression="zstd")


def read(folder: Path, shard: str) -> pa.Table:
    return pq.read_table(shard_file(folder, shard))


def ids(folder: Path, shard: str) -> pa.Array:
    """The selected ids of one catalog shard."""
    return pq.read_table(shard_file(folder, shard), columns=["id"])["id"].combine_chunks()


def count(folder: Path, shard: str) -> int:
    """Selected images of one shard, from its file's footer."""
    return pq.read_metadata(shard_file(folder, shard)).num_rows


def images(catalog_folder: Path, folder: Path | None) -> int:
    """Images that take part: the selected ones, else every accepted catalog image."""
    shards = catalog.shards(catalog_folder)
    if everything(folder):
        return sum(catalog.ok_count(catalog_folder, s) for s in shards)
    return sum(count(folder, s) for s in shards)


def selected(image_ids: pa.Array | np.ndarray | list, chosen: pa.Array) -> np.ndarray:
    """Which of `image_ids` are among `chosen` (one shard's selected ids)."""
    values = image_ids if isinstance(image_ids, pa.Array) else pa.array(list(image_ids), pa.string())
    return np.asarray(pc.is_in(values, value_set=chosen).fill_null(False), dtype=bool)
