"""Read a corpus of captioned images, shard by shard.

Three layouts: WebDataset tars (img2dataset's output), parquet files with image bytes or
image paths, and plain folders of images with optional same-name `.txt` / `.json`. Every
layout yields the same `RawSample`, so ingest treats them alike. Where the image bytes sit
raw in a local file (uncompressed tar members, folder files) the sample also carries their
location, so later stages read them back with one `pread` instead of a copy.
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import braceexpand

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
CorpusFormat = Literal["auto", "webdataset", "parquet", "folder"]


class CorpusError(ValueError):
    """The corpus as configured cannot be read (missing path, empty, unknown format)."""


@dataclass(frozen=True)
class Location:
    """Raw bytes of an image inside a local file."""

    path: str
    offset: int
    size: int


@dataclass
class RawSample:
    key: str
    image: bytes | None = None
    image_ext: str | None = None
    location: Location | None = None
    meta: dict = field(default_factory=dict)  # parsed .json, or parquet columns
    text: str | None = None  # .txt member
    error: str | None = None  # set when the sample is unusable before decoding (e.g. "invalid_json")


@dataclass(frozen=True)
class CorpusShard:
    id: str  # stable, file-name safe
    kind: Literal["webdataset", "parquet", "folder"]
    path: str
    files: tuple[str, ...] = ()  # folder shards: the image files of this shard

    def fingerprint(self) -> list:
        """What identifies this shard's content cheaply: paths, sizes and mtimes."""
        paths = self.files or (self.path,)
        return [self.id, self.kind, [(p, *_stat(p)) for p in paths]]


def _stat(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


@dataclass(frozen=True)
class ParquetColumns:
    image: str = "image"  # binary, or a struct with `bytes` (Hugging Face datasets' Image feature)
    image_path: str | None = None  # alternative: a column of image file paths
    key: str | None = "key"
    caption: str = "caption"
    re_caption: str = "re_caption"
    url: str = "url"


def expand_paths(patterns: list[str]) -> list[str]:
    out: list[str] = []
    for pattern in patterns:
        for p in braceexpand.braceexpand(str(pattern)):
            p = os.path.expanduser(p)
            matches = sorted(glob.glob(p)) if glob.has_magic(p) else ([p] if os.path.exists(p) else [])
            if not matches:
                raise CorpusError(f"corpus path not found: {p}")
            out.extend(matches)
    return list(dict.fromkeys(out))


def discover(patterns: list[str], fmt: CorpusFormat = "auto", folder_shard_size: int = 10_000) -> list[CorpusShard]:
    """The shards of a corpus, in a stable order. Raises CorpusError with one clear line."""
    if not patterns:
        raise CorpusError("no corpus given: set corpus.paths in the config or pass --corpus")
    found: list[tuple[str, str]] = []  # (kind, path)
    for path in expand_paths(patterns):
        if os.path.isdir(path):
            inner = _discover_dir(path)
            found.extend(inner if inner else [("folder", path)])
        else:
            found.append((_kind_of_file(path, fmt), path))
    shards: list[tuple[str, str, tuple[str, ...]]] = []
    for kind, path in found:
        if kind == "folder":
            files = _folder_images(path)
            for i in range(0, len(files), folder_shard_size):
                shards.append((kind, path, tuple(files[i : i + folder_shard_size])))
        else:
            shards.append((kind, path, ()))
    if not shards:
        raise CorpusError(f"corpus is empty: no shards or images under {', '.join(patterns)}")
    return _name_shards(shards)


def _discover_dir(path: str) -> list[tuple[str, str]]:
    tars = sorted(t for pattern in ("*.tar", "*.tar.gz", "*.tgz") for t in glob.glob(os.path.join(path, pattern)))
    if tars:
        return [("webdataset", t) for t in tars]
    parquets = sorted(glob.glob(os.path.join(path, "*.parquet")))
    return [("parquet", p) for p in parquets]


def _kind_of_file(path: str, fmt: CorpusFormat) -> str:
    if fmt not in ("auto", "folder"):
        return fmt
    name = path.lower()
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        return "webdataset"
    if name.endswith(".parquet"):
        return "parquet"
    raise CorpusError(f"cannot tell the format of {path}: expected .tar, .tar.gz or .parquet (or set corpus.format)")


def _folder_images(root: str) -> list[str]:
    files = []
    for dirpath, _, names in os.walk(root):
        for n in names:
            if n.rsplit(".", 1)[-1].lower() in IMAGE_EXTS and not n.startswith("."):
                files.append(os.path.join(dirpath, n))
    return sorted(files)


def _name_shards(shards: list[tuple[str, str, tuple[str, ...]]]) -> list[CorpusShard]:
    def stem(kind: str, path: str) -> str:
        base = os.path.basename(path.rstrip("/"))
        for suffix in (".tar.gz", ".tgz", ".tar", ".parquet"):
            if base.endswith(suffix):
                return base[: -len(suffix)]
        return base

    safe = ["".join(c if c.isalnum() or c in "-_" else "_" for c in stem(k, p)) or "shard" for k, p, _ in shards]
    # Checked on the sanitised ids, not the stems: "a b.tar" and "a_b.tar" would both be
    # "a_b", and one shard's catalog would overwrite the other's.
    unique = len(set(safe)) == len(safe)
    return [
        CorpusShard(s if unique else f"{i:05d}-{s}", kind, path, files)  # type: ignore[arg-type]
        for i, ((kind, path, files), s) in enumerate(zip(shards, safe))
    ]


# --- reading one shard ----------------------------------------------------------------------


def read_shard(shard: CorpusShard, columns: ParquetColumns = ParquetColumns()) -> Iterator[RawSample]:
    if shard.kind == "webdataset":
        yield from _read_tar(shard.path)
    elif shard.kind == "parquet":
        yield from _read_parquet(shard.path, columns)
    else:
        yield from _read_folder(shard.path, shard.files)


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the base name."""
    directory, base = os.path.split(name)
    head, _, ext = base.partition(".")
    return (os.path.join(directory, head) if directory else head), ext.lower()


def _read_tar(path: str) -> Iterator[RawSample]:
    seekable = path.endswith(".tar")
    with tarfile.open(path, "r:" if seekable else "r:*") as tar:
        current: dict[str, tuple[tarfile.TarInfo, bytes]] = {}
        current_key: str | None = None
        for info in tar:
            if not info.isfile():
                continue
            key, ext = _split_name(info.name)
            if key.startswith("__") or not ext:
                continue
            if key != current_key and current_key is not None:
                yield _tar_sample(path, current_key, current, seekable)
                current = {}
            current_key = key
            f = tar.extractfile(info)
            current[ext] = (info, f.read() if f else b"")
        if current_key is not None:
            yield _tar_sample(path, current_key, current, seekable)


def _tar_sample(path: str, key: str, members: dict, seekable: bool) -> RawSample:
    sample = RawSample(key=key)
    for ext in IMAGE_EXTS:
        if ext in members:
            info, data = members[ext]
            sample.image, sample.image_ext = data, ext
            if seekable:
                sample.location = Location(os.path.abspath(path), info.offset_data, info.size)
            break
    if "json" in members:
        sample.meta, sample.error = _parse_json(members["json"][1])
    if "txt" in members:
        sample.text = members["txt"][1].decode("utf-8", errors="replace").strip()
    return sample


def _parse_json(data: bytes) -> tuple[dict, str | None]:
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}, "invalid_json"
    return (meta, None) if isinstance(meta, dict) else ({}, "invalid_json")


def _read_parquet(path: str, cols: ParquetColumns) -> Iterator[RawSample]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = set(pf.schema_arrow.names)
    image_col = cols.image_path if cols.image_path else cols.image
    if image_col not in names:
        raise CorpusError(f"{path}: no image column {image_col!r} (columns: {', '.join(sorted(names))}); set corpus.parquet")
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        data = batch.to_pydict()
        for i in range(batch.num_rows):
            key = str(data[cols.key][i]) if cols.key and cols.key in data else f"{row:09d}"
            named = {"caption": cols.caption, "re_caption": cols.re_caption, "url": cols.url}  # canonical -> column
            meta = {k: data[c][i] for k, c in named.items() if c in data and data[c][i] is not None}
            sample = RawSample(key=key, meta=meta)
            value = data[image_col][i]
            if cols.image_path:
                sample.image, sample.image_ext, sample.location = _read_file(value, base=os.path.dirname(path))
            else:
                if isinstance(value, dict):  # Hugging Face datasets' Image feature
                    value = value.get("bytes")
                sample.image = value
            yield sample
            row += 1


def _read_file(value: str | None, base: str) -> tuple[bytes | None, str | None, Location | None]:
    if not value:
        return None, None, None
    path = value if os.path.isabs(value) else os.path.join(base, value)
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None, None, None
    return data, path.rsplit(".", 1)[-1].lower(), Location(os.path.abspath(path), 0, len(data))


def _read_folder(root: str, files: tuple[str, ...]) -> Iterator[RawSample]:
    for path in files:
        stem = path.rsplit(".", 1)[0]
        key = os.path.relpath(stem, root).replace(os.sep, "/")
        image, image_ext, location = _read_file(path, base=root)
        sample = RawSample(key=key, image=image, image_ext=image_ext, location=location)
        try:
            if os.path.exists(stem + ".json"):
                sample.meta, sample.error = _parse_json(Path(stem + ".json").read_bytes())
            if os.path.exists(stem + ".txt"):
                sample.text = Path(stem + ".txt").read_text(encoding="utf-8", errors="replace").strip()
        except OSError:  # a sidecar gone or unreadable: reject this sample, not the whole shard
            sample.error = "unreadable_file"
        if image is None:  # listed at discovery, gone or unreadable now
            sample.error = "unreadable_file"
        yield sample
