"""ingest: a catalog of every input sample, each accepted or rejected with its reason.

One unit per corpus shard. Every image is fully decoded once here, so later stages only
see images that decode; a sample without captions keeps its image spaces.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Literal

import pyarrow as pa
from PIL import Image, UnidentifiedImageError
from pydantic import Field

from stages import catalog
from stages.base import Resources, Stage, StageSettings, Stats, Unit, atomic_path
from stages.corpus.readers import CorpusShard, ParquetColumns, RawSample, discover, read_shard

# We bound pixels ourselves (ingest.max_pixels) before decoding, with a recorded reason.
Image.MAX_IMAGE_PIXELS = None


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


class IngestSettings(StageSettings):
    corpus: CorpusSettings = CorpusSettings()
    caption_fields: list[str] = ["caption", "org_caption", "alt_text"]
    re_caption_fields: list[str] = ["re_caption", "recaption"]
    max_pixels: int = Field(64_000_000, gt=0, description="larger images are rejected (decompression bombs)")
    min_side: int = Field(16, gt=0)
    cpus: float = Field(1.0, gt=0)


class IngestStage(Stage):
    name = "ingest"
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
        return [[Unit(s.id, {"index": i}) for i, s in enumerate(self.shards())]]

    def process(self, unit: Unit) -> Stats:
        shard = self.shards()[unit.payload["index"]]
        stats = Stats()
        rows: list[dict] = []
        seen: Counter = Counter()
        store_out = catalog.image_store_file(self.output, shard.id)
        columns = ParquetColumns(**self.settings.corpus.parquet.model_dump())
        with atomic_path(store_out, optional=True) as store_tmp:  # no image kept: no store file
            with open(store_tmp, "wb") as store:
                for sample in _guarded(read_shard(shard, columns), stats):
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
        caption = _first_text(meta, self.settings.caption_fields) or (sample.text or None)
        row = {
            "id": f"{shard}/{sample.key}",
            "shard": shard,
            "key": sample.key,
            "url": meta.get("url") if isinstance(meta.get("url"), str) else None,
            "caption": caption,
            "re_caption": _first_text(meta, self.settings.re_caption_fields),
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
            error = self._validate(sample, row)
        if error:
            row.update(status=catalog.REJECTED, error=error, path=None, offset=None, size=None)
        return row

    def _validate(self, sample: RawSample, row: dict) -> str | None:
        """Decode the image fully; return the rejection reason, or None and fill size and hash."""
        if sample.error:
            return sample.error
        if sample.image is None:
            return "no_image"
        if len(sample.image) == 0:
            return "empty_image"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(sample.image))
                w, h = img.size
                row.update(width=w, height=h)
                if w * h > self.settings.max_pixels:
                    return "too_many_pixels"
                img.load()
        except UnidentifiedImageError:
            return "not_an_image"
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            return "too_many_pixels"
        except (OSError, SyntaxError, ValueError) as e:
            return "truncated_image" if "truncated" in str(e).lower() else "decode_error"
        if min(w, h) < self.settings.min_side:
            return "too_small"
        row["sha256"] = hashlib.sha256(sample.image).hexdigest()
        return None


def _guarded(samples, stats: Stats):
    """Yield samples until the shard itself breaks (truncated or corrupt file); record that as a rejection."""
    try:
        yield from samples
    except (tarfile.TarError, OSError, EOFError, pa.ArrowException) as e:
        stats.input += 1
        stats.reject("unreadable_shard")
        stats.counters[f"unreadable_shard: {type(e).__name__}: {e}"[:200]] += 1


def _first_text(meta: dict, fields: list[str]) -> str | None:
    for f in fields:
        v = meta.get(f)
        if isinstance(v, str) and v.strip():
            return v.strip()
    return None


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
