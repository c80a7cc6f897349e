"""The catalog: one parquet file per corpus shard, one row per input sample, written by ingest.

Rejected samples stay in the catalog with their status and reason, so `input = ok + rejected`
can always be checked. Accepted rows locate their image bytes (`path`, `offset`, `size`) in
the source shard itself or, for sources that cannot be read at an offset (compressed tars,
parquet), in an image store ingest writes beside the catalog.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # "{shard}/{key}": unique in the run
        ("shard", pa.string()),
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("re_caption", pa.string()),
        ("meta", pa.string()),  # JSON of the source fields named by corpus.keep_fields; null when none
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("sha256", pa.string()),  # of the image bytes: exact duplicates share it
        ("status", pa.string()),  # "ok" or "rejected"
        ("error", pa.string()),  # the rejection reason
        ("path", pa.string()),
        ("offset", pa.int64()),
        ("size", pa.int64()),
    ]
)

OK = "ok"
REJECTED = "rejected"


def catalog_file(folder: Path, shard: str) -> Path:
    return Path(folder) / f"{shard}.parquet"


def image_store_file(folder: Path, shard: str) -> Path:
    return Path(folder) / f"{shard}.images.bin"


def shards(folder: Path) -> list[str]:
    """Shard ids present in a catalog folder, sorted."""
    return sorted(p.name[: -len(".parquet")] for p in Path(folder).glob("*.parquet") if not p.name.startswith("."))


OK_ROWS_KEY = b"megasynth.ok_rows"  # in the file's footer: planning counts accepted rows without reading any


def write(path: Path, rows: list[dict]) -> None:
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    ok = sum(1 for r in rows if r.get("status") == OK)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), OK_ROWS_KEY: str(ok).encode()})
    pq.write_table(table, path, compression="zstd")


def ok_count(folder: Path, shard: str) -> int:
    """Accepted rows of one catalog shard, from its footer (or its status column, for a file without the count)."""
    meta = pq.read_schema(catalog_file(folder, shard)).metadata or {}
    if OK_ROWS_KEY in meta:
        return int(meta[OK_ROWS_KEY])
    return read(folder, shard, columns=["status"]).num_rows


def read(folder: Path, shard: str, ok_only: bool = True, columns: list[str] | None = None) -> pa.Table:
    cols = columns if columns is None or "status" in columns or not ok_only else [*columns, "status"]
    table = pq.read_table(catalog_file(folder, shard), columns=cols)
    if ok_only:
        table = table.filter(pc.equal(table["status"], OK))
        if columns is not None and "status" not in columns:
            table = table.drop_columns(["status"])
    return table


@dataclass(frozen=True)
class ImageRef:
    id: str
    path: str
    offset: int
    size: int


def image_refs(table: pa.Table) -> list[ImageRef]:
    d = table.select(["id", "path", "offset", "size"]).to_pydict()
    return [ImageRef(*t) for t in zip(d["id"], d["path"], d["offset"], d["size"])]


class _OpenFiles(OrderedDict):
    """Read-only descriptors of one thread, least recently used closed first; all closed when the thread ends."""

    MAX = 64

    def fd(self, path: str) -> int:
        st = os.stat(path)
        key = (path, st.st_ino, st.st_mtime_ns)  # a rewritten file is reopened, never read stale
        if key in self:
            self.move_to_end(key)
            return self[key]
        fd = self[key] = os.open(path, os.O_RDONLY)
        if len(self) > self.MAX:
            os.close(self.popitem(last=False)[1])
        return fd

    def __del__(self):
        for fd in self.values():
            os.close(fd)


_THREAD = threading.local()  # one set per thread: a thread never closes a descriptor another is reading


def _fd(path: str) -> int:
    if not hasattr(_THREAD, "files"):
        _THREAD.files = _OpenFiles()
    return _THREAD.files.fd(path)


def read_image_bytes(ref: ImageRef) -> bytes:
    """Bytes of one catalogued image: a single positioned read, no copy of the corpus."""
    data = os.pread(_fd(ref.path), ref.size, ref.offset)
    if len(data) != ref.size:
        raise OSError(f"short read of {ref.id} from {ref.path}: {len(data)} of {ref.size} bytes")
    return data


def lookup(folder: Path, ids: set[str], columns: list[str]) -> dict[str, dict]:
    """Accepted catalog rows by id, reading only the shards those ids come from (id = "{shard}/{key}")."""
    return rows_by_id(lambda shard, cols: read(folder, shard, columns=cols), ids, columns)


def rows_by_id(read_shard, ids: set[str], columns: list[str]) -> dict[str, dict]:
    """Rows of a per-shard table (the catalog, the captions) by id: `read_shard(shard, columns)` is called once for
    each shard the ids come from (id = "{shard}/{key}")."""
    by_shard: dict[str, set[str]] = {}
    for i in ids:
        by_shard.setdefault(i.split("/", 1)[0], set()).add(i)
    cols = list(dict.fromkeys(["id", *columns]))
    out: dict[str, dict] = {}
    for shard, wanted in sorted(by_shard.items()):
        table = read_shard(shard, cols)
        for row in table.filter(pc.is_in(table["id"], pa.array(sorted(wanted)))).to_pylist():
            out[row["id"]] = row
    return out
