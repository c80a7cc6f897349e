"""write: the dataset, as WebDataset tars plus an index in MegaPairs' released format.

    triplets/{unit}-{n:05d}.tar     one sample per triplet: query.jpg, target.jpg,
                                    instructions.json, json (provenance)
    triplets/images/{n:05d}.tar     every referenced image once (query, target, hard
                                    negatives) as {image}.jpg, for the index below
    triplets/index.jsonl            {"q_img", "q_text", "t_img", "hns"} per triplet, paths
                                    relative to triplets/ once images/*.tar are extracted

Three waves: triplet shards per annotations unit, then image shards, then the index.
Keys, shard names and bytes depend only on the data and the settings.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from PIL import Image
from pydantic import Field

from stages import annotations, catalog, embeddings
from stages.base import Resources, Stage, StageSettings, Stats, Unit, atomic_path

PARTS = ".index-parts"  # per annotations unit: the index rows it wrote; per image shard: the ids it could not write
INDEX_FIELDS = ("q_img", "q_text", "t_img", "hns")
IMAGES = "images"
JPEG_CACHE_BYTES = 512 << 20  # per triplets unit: encoded JPEGs kept for reuse (a query recurs in its pairs)


class WriteSettings(StageSettings):
    maxcount: int = Field(10_000, gt=0, description="samples per tar shard")
    maxsize: int = Field(1_000_000_000, gt=0, description="bytes per tar shard (a shard closes once past it)")
    image_side: int = Field(512, gt=0, description="longer side of every written image")
    jpeg_quality: int = Field(90, ge=1, le=100)
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


def encode_jpeg(img: Image.Image, side: int, quality: int) -> bytes:
    """The JPEG every written image is: RGB, longer side scaled to `side` (bicubic), at `quality`."""
    img = img.convert("RGB")
    scale = side / max(img.size)
    if scale != 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BICUBIC)
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
    version = "3"  # one-to-one image keys; index.jsonl drops hard negatives whose image was not written
    Settings = WriteSettings
    settings: WriteSettings

    def resources(self) -> Resources:
        return Resources(cpus=self.settings.cpus)

    def plan(self) -> list[list[Unit]]:
        shard_units = [Unit(f"triplets-{u}", {"annotations": u}) for u in annotations.units(self.inputs["annotations"])]
        ids = sorted({i for row in self._parts() for i in row["images"]}, key=image_key)
        per = self.settings.maxcount
        image_units = [Unit(f"images-{n:05d}", {"index": n, "ids": ids[s : s + per]}) for n, s in enumerate(range(0, len(ids), per))]
        return [shard_units, image_units, [Unit("index", {"image_shards": len(image_units)})]]

    def _parts(self) -> Iterator[dict]:
        """The index rows the triplets units wrote, in unit order, one at a time."""
        for u in annotations.units(self.inputs["annotations"]):
            p = self.output / PARTS / f"{u}.jsonl"
            if p.is_file():
                with open(p) as f:
                    for line in f:
                        yield json.loads(line)

    def _unwritten_file(self, n: int) -> Path:
        return self.output / PARTS / f"{IMAGES}-{n:05d}.unwritten.json"

    def process(self, unit: Unit) -> Stats:
        if unit.id == "index":
            return self._write_index(unit.payload.get("image_shards", 0))
        if "ids" in unit.payload:
            return self._write_images(unit.payload["index"], unit.payload["ids"])
        return self._write_triplets(unit.payload["annotations"])

    def _write_triplets(self, ann_unit: str) -> Stats:
        rows = annotations.read(self.inputs["annotations"], ann_unit)
        stats = Stats(input=len(rows))
        meta = catalog.lookup(
            self.inputs["catalog"],
            {r["query_id"] for r in rows} | {r["target_id"] for r in rows} | {h["id"] for r in rows for h in r["hard_negatives"]},
            ["key", "shard", "path", "offset", "size"],
        )
        writer = ShardedTarWriter(self.output, ann_unit, self.settings.maxcount, self.settings.maxsize)
        index_rows = []
        jpegs = _JpegCache(JPEG_CACHE_BYTES)  # id -> JPEG bytes: each image encoded once in this unit
        for r in rows:
            q, t = meta.get(r["query_id"]), meta.get(r["target_id"])
            negatives = [h for h in r["hard_negatives"] if h["id"] in meta]
            try:
                if q is None or t is None:
                    raise OSError("image missing from catalog")
                q_jpg, t_jpg = jpegs.get(q, self._jpeg), jpegs.get(t, self._jpeg)
            except OSError:
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
                    "json": _json_bytes(self._provenance(r, q, t, negatives, meta)),
                }
            )
            stats.output += 1
            index_rows.append(
                {
                    "index": {
                        "q_img": image_path(r["query_id"]),
                        "q_text": r["instructions"],
                        "t_img": image_path(r["target_id"]),
                        "hns": [image_path(r["query_id"])] + [image_path(h["id"]) for h in negatives],
                    },
                    "images": [r["query_id"], r["target_id"], *(h["id"] for h in negatives)],
                }
            )
        writer.close()
        stats.counters["shards"] += len(writer.names)
        with atomic_path(self.output / PARTS / f"{ann_unit}.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(x, sort_keys=True) + "\n" for x in index_rows))
        return stats

    def _provenance(self, r: dict, q: dict, t: dict, negatives: list[dict], meta: dict) -> dict:
        return {
            "pair_id": r["pair_id"],
            "query_key": q["key"],
            "query_shard": q["shard"],
            "target_key": t["key"],
            "target_shard": t["shard"],
            "spaces": {s["space"]: round(float(s["score"]), 6) for s in r["spaces"]},
            "hard_negatives": [
                {"key": meta[h["id"]]["key"], "shard": meta[h["id"]]["shard"], "score": round(float(h["score"]), 6)} for h in negatives
            ],
            "description": r["description"],
            "word_num": r["word_num"],
            "models": {"describer": r["describer"], "instructor": r["instructor"], "spaces": self._space_models()},
            "prompt_version": {"describe": r["describe_prompt"], "instruct": r["instruct_prompt"]},
            "seed": r["seed"],
        }

    def _space_models(self) -> dict[str, str]:
        if not hasattr(self, "_spaces"):
            self._spaces = {s: m["model"] for s, m in embeddings.read_manifests(self.inputs["embeddings"]).items()}
        return self._spaces

    def _write_images(self, n: int, ids: list[str]) -> Stats:
        meta = catalog.lookup(self.inputs["catalog"], set(ids), ["path", "offset", "size"])
        stats = Stats()  # input/output count triplets; images are counters
        folder = self.output / IMAGES
        folder.mkdir(parents=True, exist_ok=True)
        unwritten = []
        with atomic_path(folder / f"{n:05d}.tar") as tmp:
            import webdataset as wds

            with open(tmp, "wb") as f, wds.TarWriter(f, user="", group="", mtime=0, encoder=False) as tar:
                for i in ids:
                    try:
                        data = self._jpeg(meta[i])
                    except (KeyError, OSError):
                        stats.counters["images_unreadable"] += 1
                        unwritten.append(i)
                        continue
                    tar.write({"__key__": image_key(i), "jpg": data})
                    stats.counters["images"] += 1
        (self.output / PARTS).mkdir(parents=True, exist_ok=True)
        with atomic_path(self._unwritten_file(n)) as tmp:  # what the index must not point at
            tmp.write_text(json.dumps(unwritten) + "\n")
        return stats

    def _write_index(self, image_shards: int) -> Stats:
        stats = Stats()
        unwritten: set[str] = set()
        for n in range(image_shards):
            unwritten.update(json.loads(self._unwritten_file(n).read_text()))
        with atomic_path(self.output / "index.jsonl") as tmp, open(tmp, "w") as f:
            for row in self._parts():
                released = {k: row["index"][k] for k in INDEX_FIELDS}  # MegaPairs' field order
                if unwritten:
                    released["hns"] = self._written_hns(row, unwritten, stats)
                f.write(json.dumps(released, ensure_ascii=False) + "\n")
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
        with Image.open(io.BytesIO(catalog.read_image_bytes(ref))) as img:
            return encode_jpeg(img, self.settings.image_side, self.settings.jpeg_quality)


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


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True).encode("utf-8")
