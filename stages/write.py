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

import io
import json
import re
from pathlib import Path

from PIL import Image
from pydantic import Field

from stages import annotations, catalog, embeddings
from stages.base import Resources, Stage, StageSettings, Stats, Unit, atomic_path

PARTS = ".index-parts"
INDEX_FIELDS = ("q_img", "q_text", "t_img", "hns")
IMAGES = "images"


class WriteSettings(StageSettings):
    maxcount: int = Field(10_000, gt=0, description="samples per tar shard")
    maxsize: int = Field(1_000_000_000, gt=0, description="bytes per tar shard (a shard closes once past it)")
    image_side: int = Field(512, gt=0, description="longer side of every written image")
    jpeg_quality: int = Field(90, ge=1, le=100)
    cpus: float = Field(1.0, gt=0)


def image_key(image_id: str) -> str:
    """A catalog id as a tar member stem: no dots or slashes (WebDataset splits keys on them)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", image_id)


def image_path(image_id: str) -> str:
    return f"{IMAGES}/{image_key(image_id)}.jpg"


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
    version = "2"  # index.jsonl in the released field order
    Settings = WriteSettings
    settings: WriteSettings

    def resources(self) -> Resources:
        return Resources(cpus=self.settings.cpus)

    def plan(self) -> list[list[Unit]]:
        shard_units = [Unit(f"triplets-{u}", {"annotations": u}) for u in annotations.units(self.inputs["annotations"])]
        ids = sorted({i for part in self._parts() for row in part for i in row["images"]}, key=image_key)
        per = self.settings.maxcount
        image_units = [Unit(f"images-{n:05d}", {"index": n, "ids": ids[s : s + per]}) for n, s in enumerate(range(0, len(ids), per))]
        return [shard_units, image_units, [Unit("index")]]

    def _parts(self) -> list[list[dict]]:
        parts = []
        for u in annotations.units(self.inputs["annotations"]):
            p = self.output / PARTS / f"{u}.jsonl"
            if p.is_file():
                parts.append([json.loads(line) for line in p.read_text().splitlines()])
        return parts

    def process(self, unit: Unit) -> Stats:
        if unit.id == "index":
            return self._write_index()
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
        for r in rows:
            q, t = meta.get(r["query_id"]), meta.get(r["target_id"])
            negatives = [h for h in r["hard_negatives"] if h["id"] in meta]
            try:
                if q is None or t is None:
                    raise OSError("image missing from catalog")
                q_jpg, t_jpg = self._jpeg(q), self._jpeg(t)
            except OSError:
                stats.reject("image_unreadable")
                continue
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
        with atomic_path(folder / f"{n:05d}.tar") as tmp:
            import webdataset as wds

            with open(tmp, "wb") as f, wds.TarWriter(f, user="", group="", mtime=0, encoder=False) as tar:
                for i in ids:
                    try:
                        data = self._jpeg(meta[i])
                    except (KeyError, OSError):
                        stats.counters["images_unreadable"] += 1
                        continue
                    tar.write({"__key__": image_key(i), "jpg": data})
                    stats.counters["images"] += 1
        return stats

    def _write_index(self) -> Stats:
        stats = Stats()
        with atomic_path(self.output / "index.jsonl") as tmp, open(tmp, "w") as f:
            for part in self._parts():
                for row in part:
                    released = {k: row["index"][k] for k in INDEX_FIELDS}  # MegaPairs' field order
                    f.write(json.dumps(released, ensure_ascii=False) + "\n")
                    stats.counters["index_rows"] += 1
        return stats

    def _jpeg(self, row: dict) -> bytes:
        ref = catalog.ImageRef(row["id"], row["path"], row["offset"], row["size"])
        with Image.open(io.BytesIO(catalog.read_image_bytes(ref))) as img:
            img = img.convert("RGB")
            scale = self.settings.image_side / max(img.size)
            if scale != 1:
                img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=self.settings.jpeg_quality)
        return buf.getvalue()


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True).encode("utf-8")
