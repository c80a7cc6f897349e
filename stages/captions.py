"""The caption table, written by the caption stage: one parquet file per catalog shard.

It is the catalog's caption layer. Every accepted catalog row has a row here with the one caption
the image is known by from then on (`text`, null when it has none) and where that caption came
from: a corpus field (`re_caption`, `caption`) or `generated` by the model named in `model`. Embed's
text spaces, the describer and each triplet's provenance all read it, so they agree on an image's
caption. An image the captioner failed on keeps the reason in `error` (and its corpus caption, if any).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from stages import catalog

SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # the catalog id, "{shard}/{key}"
        ("text", pa.string()),  # the image's caption; null: none
        ("source", pa.string()),  # "re_caption", "caption" (corpus fields) or "generated"; null: none
        ("model", pa.string()),  # the captioner, for a generated caption
        ("prompt", pa.string()),  # the caption prompt's name (packaged name, or file@digest), for a generated caption
        ("error", pa.string()),  # why the captioner gave no caption (after its retries); null otherwise
        ("attempts", pa.int32()),  # captioner requests made for this image (0: none asked)
    ]
)

GENERATED = "generated"
COLUMNS = tuple(SCHEMA.names)


def caption_file(folder: Path, shard: str) -> Path:
    return Path(folder) / f"{shard}.parquet"


def write(path: Path, rows: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path, compression="zstd")


def read(folder: Path, shard: str, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(caption_file(folder, shard), columns=columns)


def texts(folder: Path, shard: str) -> dict[str, str | None]:
    """id -> caption (or None) for one shard."""
    d = read(folder, shard, ["id", "text"]).to_pydict()
    return dict(zip(d["id"], d["text"]))


def lookup(folder: Path, ids: set[str], columns: list[str] = ("text", "source", "model")) -> dict[str, dict]:
    """Caption rows by catalog id, reading only the shards those ids come from."""
    return catalog.rows_by_id(lambda shard, cols: read(folder, shard, cols), ids, list(columns))
