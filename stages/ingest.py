"""ingest: a catalog of every input sample, each accepted or rejected with its reason.

One unit per corpus shard; the unit carries the shard itself (kind, path, files), so a worker never
looks it up in a listing of its own. Every image is fully decoded once here, with the same function
(`stages.images.open_image`) every later stage opens it with, so later stages only see images that
decode; a sample without captions keeps its image spaces. A bad sample is a catalog row with its
reason; a transient I/O error (a shard briefly missing, EIO, ESTALE) fails the unit, to be retried.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections import Counter
from pathlib import Path
from typing import Literal

import pyarrow as pa
from pydantic import Field

from stages import catalog
from stages.base import Resources, Stage, StageSettings, Stats, Unit, atomic_path, is_transient
from stages.corpus.readers import CorpusShard, MemberLimits, ParquetColumns, RawSample, discover, is_utf8, read_shard
from stages.images import ImageRejected, open_image


class ParquetColumnSettings(StageSettings):
    image: str = "image"
    image_path: str | None = None
    key: str | None = "key"
    caption: str = "caption"
    re_caption: str = "re_caption"
    url: str = "url"


class CorpusSettings(StageSettings):
    paths: list[str] = Field(default_factory=list, description="tars, parquet files or folders; globs and {a..b} braces")
    format: Literal["auto", "webdataset", "parquet", "folder"] = "auto"
    parquet: ParquetColumnSettings = ParquetColumnSettings()
    folder_shard_size: int = Field(10_000, gt=0)
    keep_fields: list[str] = Field(
        ["uid"], description="fields of each sample's json (parquet: columns) kept in the catalog's `meta` column as JSON, when present"
    )


class IngestSettings(StageSettings):
    corpus: CorpusSettings = CorpusSettings()
    caption_fields: list[str] = ["caption", "org_caption", "alt_text"]
    re_caption_fields: list[str] = ["re_caption", "recaption"]
    max_pixels: int = Field(64_000_000, gt=0, description="larger images are rejected (decompression bombs), from the header, before decoding")
    min_side: int = Field(16, gt=0, description="images with a shorter side are rejected (too_small): no stage resizes to zero")
    max_aspect_ratio: float | None = Field(
        20.0, ge=1, description="longer side / shorter side above which an image is rejected (too_elongated): a strip "
        "scaled to a model's short side would be huge; null: no limit"
    )
    max_caption_bytes: int = Field(64 << 10, gt=0, description="a longer caption (UTF-8; a .txt member or a json field) rejects its sample (caption_too_long)")
    max_json_bytes: int = Field(1 << 20, gt=0, description="a larger .json member is not read; its sample is rejected (json_too_large)")
    max_image_bytes: int = Field(256 << 20, gt=0, description="a larger image member or file is not read; its sample is rejected (image_too_large)")
    cpus: float = Field(1.0, gt=0)


class IngestStage(Stage):
    name = "ingest"
    reject_hint = "Check that corpus.paths points at the corpus you meant and that its format settings (corpus.parquet, ingest.*) fit it"
    Settings = IngestSettings
    settings: IngestSettings

    def __init__(self, settings, inputs, output):
        super().__init__(settings, inputs, output)
        self._shards: list[CorpusShard] | None = None

    def shards(self) -> list[CorpusShard]:
        if self._shards is None:
            c = self.settings.corpus
            self._shards = discover(c.paths, c.format, c.folder_shard_size)
        return self._shards

    def resources(self) -> Resources:
        return Resources(cpus=self.settings.cpus)

    def fingerprint_extra(self) -> dict:
        return {"shards": [s.fingerprint() for s in self.shards()]}

    def check(self) -> None:
        from stages.corpus.readers import CorpusError

        if not any(_has_samples(s) for s in self.shards()):
            raise CorpusError(f"corpus is empty: no samples in {len(self.shards())} shard(s) of {', '.join(self.settings.corpus.paths)}")

    def plan(self) -> list[list[Unit]]:
        return [[Unit(s.id, {"kind": s.kind, "path": s.path, "files": list(s.files)}) for s in self.shards()]]

    def process(self, unit: Unit) -> Stats:
        p = unit.payload
        shard = CorpusShard(unit.id, p["kind"], p["path"], tuple(p["files"]))
        s = self.settings
        limits = MemberLimits(image=s.max_image_bytes, json=s.max_json_bytes, text=s.max_caption_bytes)
        stats = Stats()
        rows: list[dict] = []
        seen: Counter = Counter()
        store_out = catalog.image_store_file(self.output, shard.id)
        columns = ParquetColumns(**self.settings.corpus.parquet.model_dump(), kept=tuple(self.settings.corpus.keep_fields))
        with atomic_path(store_out, optional=True) as store_tmp:  # no image kept: no store file
            with open(store_tmp, "wb") as store:
                for sample in _guarded(read_shard(shard, columns, limits), stats):
                    stats.input += 1
                    row = self._row(shard.id, sample, seen)
                    if row["status"] == catalog.OK:
                        stats.output += 1
                        if not row["caption"] and not row["re_caption"]:
                            stats.counters["captionless"] += 1
                        if sample.location is None:  # not readable at an offset: keep a copy
                            row.update(path=str(store_out.resolve()), offset=store.tell(), size=len(sample.image))
                            store.write(sample.image)
                    else:
                        stats.reject(row["error"])
                    rows.append(row)
                used_store = store.tell() > 0
            if not used_store:
                store_tmp.unlink()
        if not used_store:
            store_out.unlink(missing_ok=True)
        with atomic_path(catalog.catalog_file(self.output, shard.id)) as tmp:
            catalog.write(tmp, rows)
        return stats

    def _row(self, shard: str, sample: RawSample, seen: Counter) -> dict:
        meta = sample.meta
        caption, caption_error = _first_text(meta, self.settings.caption_fields)
        re_caption, re_caption_error = _first_text(meta, self.settings.re_caption_fields)
        row = {
            "id": f"{shard}/{sample.key}",
            "shard": shard,
            "key": sample.key,
            "url": meta.get("url") if isinstance(meta.get("url"), str) else None,
            "caption": caption or (sample.text or None),
            "re_caption": re_caption,
            "meta": _kept_fields(meta, self.settings.corpus.keep_fields),
            "status": catalog.OK,
            "error": None,
        }
        if sample.location is not None:
            row.update(path=sample.location.path, offset=sample.location.offset, size=sample.location.size)
        seen[sample.key] += 1
        if seen[sample.key] > 1:  # rejected whatever its image: no need to decode and hash it
            error = "duplicate_key"
            row["id"] = f"{row['id']}#{seen[sample.key]}"  # ids stay unique in the catalog
        else:
            error = sample.error or caption_error or re_caption_error or self._text_error(row)
        unstorable = _unicode_error(row)  # always run: a row with lone surrogates could not be written at all
        error = error or unstorable
        if not error:
            error = self._validate(sample, row)
        if error:
            row.update(status=catalog.REJECTED, error=error, path=None, offset=None, size=None)
        return row

    def _text_error(self, row: dict) -> str | None:
        for field in ("caption", "re_caption"):
            v = row[field]
            if v and is_utf8(v) and len(v.encode("utf-8")) > self.settings.max_caption_bytes:
                return "caption_too_long"
        return None

    def _validate(self, sample: RawSample, row: dict) -> str | None:
        """Decode the image fully; return the rejection reason, or None and fill size and hash."""
        if sample.image is None:
            return "no_image"
        s = self.settings
        try:
            img = open_image(sample.image, max_pixels=s.max_pixels, min_side=s.min_side, max_aspect_ratio=s.max_aspect_ratio)
        except ImageRejected as e:
            return e.reason
        row.update(width=img.width, height=img.height)  # as shown: EXIF orientation applied
        row["sha256"] = hashlib.sha256(sample.image).hexdigest()
        return None


def _guarded(samples, stats: Stats):
    """Yield samples until the shard itself breaks (truncated or corrupt file); record that as a rejection.
    A transient I/O error is not a broken shard: it propagates, and the unit is retried."""
    try:
        yield from samples
    except (tarfile.TarError, OSError, EOFError, pa.ArrowException) as e:
        if is_transient(e):
            raise
        stats.input += 1
        stats.reject("unreadable_shard")
        stats.counters[f"unreadable_shard: {type(e).__name__}: {e}"[:200]] += 1


def _first_text(meta: dict, fields: list[str]) -> tuple[str | None, str | None]:
    """The first non-blank text among `fields`, or the reason the first present non-text value rejects the sample."""
    for f in fields:
        v = meta.get(f)
        if v is None:
            continue
        if not isinstance(v, str):
            return None, "caption_not_text"
        if v.strip():
            return v.strip(), None
    return None, None


# Text fields of a catalog row that come from the corpus; lone surrogates in any of them cannot be stored.
_SOURCE_TEXT = ("caption", "re_caption", "url", "meta")
_NAMES = ("id", "key", "path")


def _unicode_error(row: dict) -> str | None:
    """Why the row's text is not valid Unicode (then made storable: names escaped, texts dropped), if it is not."""
    error = None
    for f in _NAMES:
        if isinstance(row.get(f), str) and not is_utf8(row[f]):
            row[f] = row[f].encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            error = error or "name_not_utf8"
    for f in _SOURCE_TEXT:
        if isinstance(row.get(f), str) and not is_utf8(row[f]):
            row[f] = None
            error = error or f"{f}_not_unicode"
    return error


def _kept_fields(meta: dict, fields: list[str]) -> str | None:
    kept = {f: meta[f] for f in fields if meta.get(f) is not None}
    # default=str: a parquet timestamp or decimal is kept as text rather than failing the shard
    return json.dumps(kept, ensure_ascii=False, sort_keys=True, default=str) if kept else None


def _has_samples(shard: CorpusShard) -> bool:
    if shard.kind == "folder":
        return bool(shard.files)
    if shard.kind == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(shard.path).metadata.num_rows > 0
    try:
        with tarfile.open(shard.path, "r:*") as tar:
            return tar.next() is not None
    except tarfile.TarError:
        return Path(shard.path).stat().st_size > 0  # unreadable but not empty: ingest records why
