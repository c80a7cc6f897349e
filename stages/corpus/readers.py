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

from stages.base import is_transient

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
class MemberLimits:
    """Bytes above which a member (or sidecar file) is not read at all and its sample is rejected."""

    image: int = 256 << 20
    json: int = 1 << 20
    text: int = 64 << 10


# Why a tar member that is not a regular file rejects its sample (never followed, never read).
SPECIAL_MEMBERS = {
    tarfile.SYMTYPE: "member_is_symlink",
    tarfile.LNKTYPE: "member_is_hardlink",
    tarfile.CHRTYPE: "member_is_device",
    tarfile.BLKTYPE: "member_is_device",
    tarfile.FIFOTYPE: "member_is_fifo",
}


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
    kept: tuple[str, ...] = ()  # further columns passed on under their own names (ingest's corpus.keep_fields)


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


def read_shard(shard: CorpusShard, columns: ParquetColumns = ParquetColumns(), limits: MemberLimits = MemberLimits()) -> Iterator[RawSample]:
    """The samples of one shard, in order. A transient I/O error (`stages.base.is_transient`) propagates:
    the unit is retried, never a sample rejected for it."""
    if shard.kind == "webdataset":
        yield from _read_tar(shard.path, limits)
    elif shard.kind == "parquet":
        yield from _read_parquet(shard.path, columns, limits)
    else:
        yield from _read_folder(shard.path, shard.files, limits)


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the base name."""
    directory, base = os.path.split(name)
    head, _, ext = base.partition(".")
    return (os.path.join(directory, head) if directory else head), ext.lower()


def _read_tar(path: str, limits: MemberLimits) -> Iterator[RawSample]:
    seekable = path.endswith(".tar")
    with tarfile.open(path, "r:" if seekable else "r:*") as tar:
        current: dict[str, tuple[tarfile.TarInfo, bytes]] = {}
        problem: str | None = None  # the first reason one of the current sample's members rejects it
        current_key: str | None = None
        for info in tar:
            if info.isdir():  # a folder entry holds no sample's data
                continue
            key, ext = _split_name(info.name)
            if key.startswith("__") or not ext:
                continue
            # a new key, or the same extension again (the same key twice in a row): a new sample
            if current_key is not None and (key != current_key or ext in current):
                yield _tar_sample(path, current_key, current, problem, seekable)
                current, problem = {}, None
            current_key = key
            reason = _member_problem(info, ext, limits)
            if reason:
                problem = problem or reason
                current[ext] = (info, b"")
                continue
            if ext not in IMAGE_EXTS and ext not in ("json", "txt"):
                continue  # not read: nothing in the catalog uses it
            f = tar.extractfile(info)
            current[ext] = (info, f.read() if f else b"")
        if current_key is not None:
            yield _tar_sample(path, current_key, current, problem, seekable)


def _member_problem(info: tarfile.TarInfo, ext: str, limits: MemberLimits) -> str | None:
    """Why this member rejects its sample before any byte of it is read, if it does."""
    if not info.isfile():
        return SPECIAL_MEMBERS.get(info.type, "member_not_a_file")
    if not is_utf8(info.name):
        return "member_name_not_utf8"
    if info.name.startswith("/") or ".." in info.name.split("/"):
        return "unsafe_member_name"
    return _too_large(ext, info.size, limits)


def _too_large(ext: str, size: int, limits: MemberLimits) -> str | None:
    if ext in IMAGE_EXTS and size > limits.image:
        return "image_too_large"
    if ext == "json" and size > limits.json:
        return "json_too_large"
    if ext == "txt" and size > limits.text:
        return "caption_too_long"
    return None


def is_utf8(text: str) -> bool:
    """Whether `text` is valid Unicode: no lone surrogates (from JSON escapes, or undecodable bytes in a name)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _tar_sample(path: str, key: str, members: dict, problem: str | None, seekable: bool) -> RawSample:
    sample = RawSample(key=key, error=problem)
    if problem:  # nothing of a rejected sample is parsed
        return sample
    for ext in IMAGE_EXTS:
        if ext in members:
            info, data = members[ext]
            sample.image, sample.image_ext = data, ext
            if seekable and not info.issparse():  # a sparse member's bytes are not contiguous in the tar
                sample.location = Location(os.path.abspath(path), info.offset_data, info.size)
            break
    if "json" in members:
        sample.meta, sample.error = _parse_json(members["json"][1])
    if "txt" in members:
        sample.text, error = _decode_text(members["txt"][1])
        sample.error = sample.error or error
    return sample


def _decode_text(data: bytes) -> tuple[str | None, str | None]:
    try:
        return data.decode("utf-8").strip(), None
    except UnicodeDecodeError:
        return None, "caption_not_utf8"


def _parse_json(data: bytes) -> tuple[dict, str | None]:
    try:
        meta = json.loads(data.decode("utf-8"))
    except RecursionError:  # nested deeper than the interpreter's recursion limit
        return {}, "json_too_deep"
    except ValueError:  # not UTF-8, not JSON, or an integer of more digits than Python converts
        return {}, "invalid_json"
    return (meta, None) if isinstance(meta, dict) else ({}, "json_not_object")


def _read_parquet(path: str, cols: ParquetColumns, limits: MemberLimits) -> Iterator[RawSample]:
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
            meta.update({c: data[c][i] for c in cols.kept if c in data and data[c][i] is not None and c not in meta})
            sample = RawSample(key=key, meta=meta)
            value = data[image_col][i]
            if cols.image_path:
                sample.image, sample.image_ext, sample.location, sample.error = _read_file(
                    value, os.path.dirname(path), limits, listed=False
                )
            else:
                if isinstance(value, dict):  # Hugging Face datasets' Image feature
                    value = value.get("bytes")
                sample.image = value
            yield sample
            row += 1


def _read_file(value: str | None, base: str, limits: MemberLimits, listed: bool) -> tuple[bytes | None, str | None, Location | None, str | None]:
    """An image file's bytes, extension and location, or the reason it cannot be used.

    A file that was `listed` (found at discovery) and is missing now is a transient error (a shared
    filesystem briefly without it); a path named in a table that does not exist is that row's fault.
    """
    if not value:
        return None, None, None, None
    path = value if os.path.isabs(value) else os.path.join(base, value)
    ext = path.rsplit(".", 1)[-1].lower()
    try:
        size = os.stat(path).st_size
        if _too_large(ext if ext in IMAGE_EXTS else "jpg", size, limits):
            return None, ext, None, "image_too_large"
        data = Path(path).read_bytes()
    except OSError as e:
        if not listed and isinstance(e, FileNotFoundError):
            return None, ext, None, "image_file_missing"
        if is_transient(e):
            raise
        return None, ext, None, "unreadable_file"
    return data, ext, Location(os.path.abspath(path), 0, len(data)), None


def _read_sidecar(path: str, ext: str, limits: MemberLimits) -> tuple[bytes | None, str | None]:
    """A folder image's `.json` or `.txt` beside it: (bytes, None), (None, None) when absent, or the reason it rejects."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return None, None
    too_large = _too_large(ext, size, limits)
    return (None, too_large) if too_large else (Path(path).read_bytes(), None)


def _read_folder(root: str, files: tuple[str, ...], limits: MemberLimits) -> Iterator[RawSample]:
    for path in files:
        stem = path.rsplit(".", 1)[0]
        key = os.path.relpath(stem, root).replace(os.sep, "/")
        image, image_ext, location, error = _read_file(path, root, limits, listed=True)
        sample = RawSample(key=key, image=image, image_ext=image_ext, location=location, error=error)
        try:
            meta, meta_error = _read_sidecar(stem + ".json", "json", limits)
            text, text_error = _read_sidecar(stem + ".txt", "txt", limits)
        except OSError as e:
            if is_transient(e):
                raise
            meta = text = None
            meta_error = "unreadable_file"  # a sidecar unreadable: reject this sample, not the whole shard
            text_error = None
        if meta is not None:
            sample.meta, meta_error = _parse_json(meta)
        if text is not None:
            sample.text, text_error = _decode_text(text)
        sample.error = sample.error or meta_error or text_error
        yield sample
