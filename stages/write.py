"""write: the dataset, as WebDataset tars plus an index in MegaPairs' released format.

    triplets/triplets-{u:05d}-{n:05d}.tar   one sample per triplet: query.jpg, target.jpg,
                                            instructions.json, json (provenance)
    triplets/images/{b:05d}-{n:05d}.tar     every referenced image once (query, target, hard
                                            negatives) as {image}.jpg, for the index below
    triplets/index.jsonl                    {"q_img", "q_text", "t_img", "hns"} per triplet, paths
                                            relative to triplets/ once images/*.tar are extracted,
                                            then the source's url and kept fields of query and target

Three waves. Triplet units take about `triplets_per_unit` annotated pairs each, whatever the
layout of the annotation files, and note which images they reference. Image units each own
a range of a 64-bit hash of the image id, so every image is written once without the driver
ever holding the ids: a unit reads, from every triplet unit's notes, the ids of its range.
The index unit writes index.jsonl, then the notes (under the stage's scratch folder, outside
the output) are removed. Keys, shard names and bytes depend only on the data and the settings.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import shutil
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image
from pydantic import Field

from stages import annotations, captions, catalog, embeddings, neighbours, units
from stages.base import Resources, Stage, StageSettings, Stats, Unit, atomic_path, is_transient
from stages.images import open_image

INDEX_FIELDS = ("q_img", "q_text", "t_img", "hns")
INDEX_EXTRA_FIELDS = ("q_url", "q_meta", "t_url", "t_meta")  # source url and kept fields (`corpus.keep_fields`) of query and target

# An image's caption as the caption stage chose it: the text, its source (re_caption, caption, generated) and
# the captioner that wrote it when generated (see stages/captions.py).
CAPTION = pa.struct([("text", pa.string()), ("source", pa.string()), ("model", pa.string())])
NO_CAPTION = {"text": None, "source": None, "model": None}
# The `json` member of every triplet sample; the dataset card declares these types (a test holds every sample to them).
PROVENANCE = pa.struct(
    [
        ("pair_id", pa.string()),
        ("query_key", pa.string()),
        ("query_shard", pa.string()),
        ("query_url", pa.string()),
        ("query_meta", pa.string()),  # JSON object text
        ("target_key", pa.string()),
        ("target_shard", pa.string()),
        ("target_url", pa.string()),
        ("target_meta", pa.string()),
        ("query_caption", CAPTION),
        ("target_caption", CAPTION),
        ("spaces", pa.list_(pa.struct([("space", pa.string()), ("score", pa.float64())]))),
        ("hard_negatives", pa.list_(pa.struct([("key", pa.string()), ("shard", pa.string()), ("space", pa.string()), ("score", pa.float64())]))),
        ("description", pa.string()),
        ("word_num", pa.int64()),
        ("models", pa.struct([("describer", pa.string()), ("instructor", pa.string()),
                              ("spaces", pa.list_(pa.struct([("space", pa.string()), ("model", pa.string())])))])),  # fmt: skip
        ("prompt_version", pa.struct([("describe", pa.string()), ("instruct", pa.string())])),
        ("seed", pa.int64()),
    ]
)
# Members of a triplet sample, in tar order (sorted, as webdataset writes them); "jpg" members are images.
SAMPLE_MEMBERS = {"instructions.json": pa.list_(pa.string()), "json": PROVENANCE, "query.jpg": pa.binary(), "target.jpg": pa.binary()}
IMAGES = "images"
CARD_ONLY = ("license", "source_license", "model_licenses")  # settings the dataset card reads; the written bytes do not depend on them
JPEG_CACHE_BYTES = 512 << 20  # per triplets unit: encoded JPEGs kept for reuse (a query recurs in its pairs)


class WriteSettings(StageSettings):
    triplets_per_unit: int = Field(50_000, gt=0, description="annotated pairs (kept or rejected) per triplets unit")
    images_per_unit: int = Field(50_000, gt=0, description="referenced images per image unit (at most; images are shared between triplets)")
    maxcount: int = Field(10_000, gt=0, description="samples per tar shard")
    maxsize: int = Field(1_000_000_000, gt=0, description="bytes per tar shard (a shard closes once past it)")
    image_side: int = Field(512, gt=0, description="longer side of every written image (a smaller image keeps its size unless `upscale`)")
    upscale: bool = Field(False, description="scale smaller images up to image_side too, as write v4 and earlier did (pixels, not detail)")
    jpeg_quality: int = Field(90, ge=1, le=100)
    license: str = Field("mit", description="licence of the annotations (instructions, descriptions, provenance), a Hub licence id; MegaPairs' were MIT")
    source_license: str = Field(
        "unknown", description="licence of the corpus the images, urls and captions came from, as its publisher states it; the card repeats it"
    )
    model_licenses: dict[str, str] = Field(
        {}, description="licence by describer/instructor model name, for the card where the model folder's own card does not state one"
    )
    cpus: float = Field(1.0, gt=0)


_PLAIN_ID = re.compile(r"[A-Za-z0-9-]+(/[A-Za-z0-9_-]+)?")  # "{shard}/{key}" (or a bare name) kept as is, "/" -> "_"
_HASHED_TAIL = re.compile(r"_[0-9a-f]{16}$")


def image_key(image_id: str) -> str:
    """A catalog id as a tar member stem: no dots or slashes (WebDataset splits keys on them); one-to-one.

    A plain id, `{shard}/{key}` with a shard of [A-Za-z0-9-] and a key of [A-Za-z0-9_-] (or a bare
    [A-Za-z0-9-] name), keeps its characters with "/" as "_": the first "_" is the separator, so these
    never collide. Any other id is sanitised ([^A-Za-z0-9_-] -> "_") and gets "_" + 16 hex digits of
    blake2b of the id; a plain id that would end like that is hashed too, so the two forms never meet."""
    if _PLAIN_ID.fullmatch(image_id):
        key = image_id.replace("/", "_")
        if not _HASHED_TAIL.search(key):
            return key
    digest = hashlib.blake2b(image_id.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
    return f"{re.sub(r'[^A-Za-z0-9_-]', '_', image_id)}_{digest}"


def image_path(image_id: str) -> str:
    return f"{IMAGES}/{image_key(image_id)}.jpg"


def written_size(size: tuple[int, int], side: int, upscale: bool) -> tuple[int, int]:
    """Width and height of a written image: longer side scaled to `side`, but never up unless `upscale`; no side below 1."""
    scale = side / max(size)
    if scale == 1 or (scale > 1 and not upscale):
        return size
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def encode_jpeg(img: Image.Image, side: int, quality: int, upscale: bool = True) -> bytes:
    """The JPEG every written image is: RGB, resized (bicubic) to `written_size`, at `quality`."""
    img = img.convert("RGB")
    size = written_size(img.size, side, upscale)
    if size != img.size:
        img = img.resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class ShardedTarWriter:
    """Tar shards `{prefix}-{n:05d}.tar` (or `{n:05d}.tar`) rolled over by count and size, each renamed into place when closed."""

    def __init__(self, folder: Path, prefix: str, maxcount: int, maxsize: int):
        self.folder, self.prefix, self.maxcount, self.maxsize = folder, prefix, maxcount, maxsize
        self.index, self.count, self.size = -1, 0, 0
        self.names: list[str] = []
        self._ctx = self._tar = self._file = None

    def write(self, sample: dict) -> None:
        import webdataset as wds

        if self._tar is None or self.count >= self.maxcount or self.size >= self.maxsize:
            self.close()
            self.index += 1
            name = f"{self.prefix}-{self.index:05d}.tar" if self.prefix else f"{self.index:05d}.tar"
            self.names.append(name)
            self._ctx = atomic_path(self.folder / name)
            self._file = open(self._ctx.__enter__(), "wb")
            self._tar = wds.TarWriter(self._file, user="", group="", mtime=0, encoder=False)
            self.count = self.size = 0
        self.size += self._tar.write(sample)
        self.count += 1

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._file.close()
            self._ctx.__exit__(None, None, None)
            self._tar = self._file = self._ctx = None


class WriteStage(Stage):
    name = "write"
    version = "7"  # 7: query and target captions with their source (generated by which model); 6: each hard negative says the space of its score; 5: stable provenance types, source url/meta, no upscaling
    Settings = WriteSettings
    settings: WriteSettings

    def resources(self) -> Resources:
        return Resources(cpus=self.settings.cpus)

    def reuse_key(self) -> dict:
        return self.settings.model_dump(mode="json", exclude={"cpus", *CARD_ONLY})

    def plan(self) -> list[list[Unit]]:
        counts = units.row_counts(self.inputs["annotations"], annotations.units(self.inputs["annotations"]))
        sliced = units.slice_rows(counts, self.settings.triplets_per_unit)
        triplet_units = [Unit(f"triplets-{i:05d}", {"slices": sl}, items=units.unit_rows(sl)) for i, sl in enumerate(sliced)]
        names = [u.id for u in triplet_units]
        # An upper bound on distinct images (each unit counts its own), read from the notes' footers once they exist.
        notes = [self._notes(u) for u in names]
        referenced = sum(pq.read_metadata(n).num_rows for n in notes if n.is_file())
        buckets = max(1, math.ceil(referenced / self.settings.images_per_unit)) if all(n.is_file() for n in notes) else 0
        image_units = [Unit(f"images-{b:05d}", {"bucket": b, "of": buckets, "notes": names}) for b in range(buckets)]
        return [triplet_units, image_units, [Unit("index", {"notes": names, "image_units": buckets})]]

    def finish(self) -> None:
        shutil.rmtree(self.inputs["scratch"], ignore_errors=True)  # no scratch left beside the dataset

    def _notes(self, unit_id: str) -> Path:
        """A triplets unit's referenced image ids, sorted by their hash: what the image units read."""
        return self.inputs["scratch"] / f"{unit_id}.images.parquet"

    def _index_part(self, unit_id: str) -> Path:
        return self.inputs["scratch"] / f"{unit_id}.index.jsonl"

    def _unwritten_file(self, bucket: int) -> Path:
        return self.inputs["scratch"] / f"{IMAGES}-{bucket:05d}.unwritten.json"

    def process(self, unit: Unit) -> Stats:
        if unit.id == "index":
            return self._write_index(unit.payload["notes"], unit.payload["image_units"])
        if unit.id.startswith(f"{IMAGES}-"):
            return self._write_images(unit.payload["bucket"], unit.payload["of"], unit.payload["notes"])
        return self._write_triplets(unit.id, unit.payload["slices"])

    def _write_triplets(self, unit_id: str, slices: list) -> Stats:
        rows = [r for r in units.read_slices(self.inputs["annotations"], slices).to_pylist() if r["status"] == annotations.OK]
        stats = Stats(input=len(rows))
        meta = catalog.lookup(
            self.inputs["catalog"],
            {r["query_id"] for r in rows} | {r["target_id"] for r in rows} | {h["id"] for r in rows for h in r["hard_negatives"]},
            ["key", "shard", "path", "offset", "size", "url", "meta"],
        )
        caps = {i: {k: c[k] for k in CAPTION.names} for i, c in captions.lookup(self.inputs["captions"], {r[k] for r in rows for k in ("query_id", "target_id")}).items()}
        writer = ShardedTarWriter(self.output, unit_id, self.settings.maxcount, self.settings.maxsize)
        index_rows = []
        referenced: set[str] = set()
        jpegs = _JpegCache(JPEG_CACHE_BYTES)  # id -> JPEG bytes: each image encoded once in this unit
        for r in rows:
            q, t = meta.get(r["query_id"]), meta.get(r["target_id"])
            negatives = [h for h in r["hard_negatives"] if h["id"] in meta]
            try:
                if q is None or t is None:
                    raise OSError("image missing from catalog")
                q_jpg, t_jpg = jpegs.get(q, self._jpeg), jpegs.get(t, self._jpeg)
            except OSError as e:
                if is_transient(e):  # may pass: the unit is retried, nothing is rejected
                    raise
                stats.reject("image_unreadable")
                continue
            if len(negatives) < len(r["hard_negatives"]):  # missing from the catalog: left out of the sample and the index
                stats.counters["hard_negatives_dropped"] += len(r["hard_negatives"]) - len(negatives)
            writer.write(
                {
                    "__key__": r["pair_id"],
                    "query.jpg": q_jpg,
                    "target.jpg": t_jpg,
                    "instructions.json": _json_bytes(r["instructions"]),
                    "json": _json_bytes(self._provenance(r, q, t, negatives, meta, caps)),
                }
            )
            stats.output += 1
            images = [r["query_id"], r["target_id"], *(h["id"] for h in negatives)]
            referenced.update(images)
            index_rows.append(
                {
                    "index": {
                        "q_img": image_path(r["query_id"]),
                        "q_text": r["instructions"],
                        "t_img": image_path(r["target_id"]),
                        "hns": [image_path(r["query_id"])] + [image_path(h["id"]) for h in negatives],
                        "q_url": q["url"],
                        "q_meta": _source_fields(q),
                        "t_url": t["url"],
                        "t_meta": _source_fields(t),
                    },
                    "images": images,
                }
            )
            self.advance(1)
        writer.close()
        stats.counters["shards"] += len(writer.names)
        stats.counters["images_referenced"] += len(referenced)
        with atomic_path(self._index_part(unit_id)) as tmp:
            tmp.write_text("".join(json.dumps(x, sort_keys=True) + "\n" for x in index_rows))
        ordered = sorted((neighbours.hash64(i), i) for i in referenced)  # each id hashed once
        with atomic_path(self._notes(unit_id)) as tmp:
            table = pa.table({"hash": pa.array([h for h, _ in ordered], pa.uint64()), "id": pa.array([i for _, i in ordered], pa.string())})
            pq.write_table(table, tmp, row_group_size=4096)
        return stats

    def _provenance(self, r: dict, q: dict, t: dict, negatives: list[dict], meta: dict, caps: dict) -> dict:
        """The sample's `json`: the same fields and types in every sample of every run (the card declares them as
        PROVENANCE), so readers that infer a schema from a few samples, or one declared once, read them all;
        source fields the config keeps (`corpus.keep_fields`) vary by corpus, so they travel as JSON text."""
        return {
            "pair_id": r["pair_id"],
            "query_key": q["key"],
            "query_shard": q["shard"],
            "query_url": q["url"],
            "query_meta": json.dumps(_source_fields(q), ensure_ascii=False, sort_keys=True),
            "target_key": t["key"],
            "target_shard": t["shard"],
            "target_url": t["url"],
            "target_meta": json.dumps(_source_fields(t), ensure_ascii=False, sort_keys=True),
            "query_caption": caps.get(r["query_id"], NO_CAPTION),
            "target_caption": caps.get(r["target_id"], NO_CAPTION),
            "spaces": [{"space": s["space"], "score": round(float(s["score"]), 6)} for s in r["spaces"]],
            "hard_negatives": [
                {"key": meta[h["id"]]["key"], "shard": meta[h["id"]]["shard"], "space": h.get("space"), "score": round(float(h["score"]), 6)}
                for h in negatives
            ],
            "description": r["description"],
            "word_num": r["word_num"],
            "models": {"describer": r["describer"], "instructor": r["instructor"], "spaces": self._space_models()},
            "prompt_version": {"describe": r["describe_prompt"], "instruct": r["instruct_prompt"]},
            "seed": r["seed"],
        }

    def _space_models(self) -> list[dict[str, str]]:
        if not hasattr(self, "_spaces"):
            manifests = embeddings.read_manifests(self.inputs["embeddings"])
            self._spaces = [{"space": s, "model": manifests[s]["model"]} for s in sorted(manifests)]
        return self._spaces

    def _write_images(self, bucket: int, buckets: int, notes: list[str]) -> Stats:
        lo, hi = (pa.scalar(v, pa.uint64()) for v in _hash_range(bucket, buckets))
        ids: set[str] = set()
        for u in notes:  # the notes are sorted by hash: row-group statistics skip the rest of each file
            t = pq.read_table(self._notes(u), columns=["id"], filters=(pc.field("hash") >= lo) & (pc.field("hash") <= hi))
            ids.update(t["id"].to_pylist())
        ordered = sorted(ids, key=image_key)
        meta = catalog.lookup(self.inputs["catalog"], ids, ["path", "offset", "size"])
        stats = Stats()  # input/output count triplets; images are counters
        unwritten = []
        writer = ShardedTarWriter(self.output / IMAGES, f"{bucket:05d}", self.settings.maxcount, self.settings.maxsize)
        for i in ordered:
            try:
                data = self._jpeg(meta[i])
            except (KeyError, OSError) as e:
                if is_transient(e):
                    raise
                stats.counters["images_unreadable"] += 1
                unwritten.append(i)
                continue
            writer.write({"__key__": image_key(i), "jpg": data})
            stats.counters["images"] += 1
            self.advance(1)
        writer.close()
        with atomic_path(self._unwritten_file(bucket)) as tmp:  # what the index must not point at
            tmp.write_text(json.dumps(unwritten) + "\n")
        return stats

    def _write_index(self, notes: list[str], buckets: int) -> Stats:
        stats = Stats()
        unwritten: set[str] = set()
        for b in range(buckets):
            unwritten.update(json.loads(self._unwritten_file(b).read_text()))
        with atomic_path(self.output / "index.jsonl") as tmp, open(tmp, "w") as f:
            for u in notes:
                with open(self._index_part(u)) as part:
                    for line in part:
                        row = json.loads(line)
                        released = {k: row["index"][k] for k in INDEX_FIELDS}  # MegaPairs' field order
                        if unwritten:
                            released["hns"] = self._written_hns(row, unwritten, stats)
                        extra = {k: row["index"][k] for k in INDEX_EXTRA_FIELDS}  # after the released ones: readers of those ignore them
                        f.write(json.dumps(released | extra, ensure_ascii=False) + "\n")
                        stats.counters["index_rows"] += 1
        return stats

    @staticmethod
    def _written_hns(row: dict, unwritten: set[str], stats: Stats) -> list[str]:
        """`hns` without the images the image shards lack. hns[0] is the query (images[0]); hns[1:] are images[2:]."""
        images = row["images"]
        hns_ids = [images[0], *images[2:]]
        hns = row["index"]["hns"]
        assert len(hns_ids) == len(hns), "index part out of step: hns and images differ"
        kept = [p for p, i in zip(hns, hns_ids) if i not in unwritten]
        if len(kept) < len(hns):
            stats.counters["hard_negatives_dropped"] += len(hns) - len(kept)
        return kept

    def _jpeg(self, row: dict) -> bytes:
        ref = catalog.ImageRef(row["id"], row["path"], row["offset"], row["size"])
        # oriented, RGB, transparency on white, as every stage sees it; a rejection is an OSError, counted as unreadable
        s = self.settings
        return encode_jpeg(open_image(catalog.read_image_bytes(ref)), s.image_side, s.jpeg_quality, upscale=s.upscale)


class _JpegCache:
    """Encoded JPEGs by catalog id, least recently used dropped past `max_bytes` (a unit's rows group by query)."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.size = max_bytes, 0
        self._data: OrderedDict[str, bytes] = OrderedDict()

    def get(self, row: dict, encode) -> bytes:
        key = row["id"]
        data = self._data.get(key)
        if data is not None:
            self._data.move_to_end(key)
            return data
        data = encode(row)
        self._data[key] = data
        self.size += len(data)
        while self.size > self.max_bytes and len(self._data) > 1:
            self.size -= len(self._data.popitem(last=False)[1])
        return data


def _hash_range(bucket: int, buckets: int) -> tuple[int, int]:
    """The inclusive range of id hashes image unit `bucket` of `buckets` owns."""
    lo = bucket * 2**64 // buckets
    return lo, (bucket + 1) * 2**64 // buckets - 1


def _source_fields(row: dict) -> dict:
    """The corpus fields the catalog kept for an image (`corpus.keep_fields`), {} when none."""
    return json.loads(row["meta"]) if row["meta"] else {}


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True).encode("utf-8")
