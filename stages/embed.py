"""embed: L2-normalised embeddings of every catalogued image, in several spaces.

One unit per catalog shard. Each image is decoded once for all image spaces; captions
(re_caption, else caption) go through the text space sorted by token length. Output:
one file per space and shard (see `stages.embeddings`).
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field, model_validator

from stages import catalog, embeddings
from stages.base import Resources, Stage, StageSettings, Stats, Unit
from stages.models.encoders import DTYPES, ImageEncoder, Pooling, TextEncoder, check_model_path, resolve_device


class SpaceSettings(StageSettings):
    kind: Literal["image", "text"]
    model: str = Field(description="HF hub id or local folder, loaded with from_pretrained")
    pooling: Pooling = "auto"
    max_length: int = Field(128, gt=0, description="text spaces: tokens per caption")
    text_fields: list[Literal["re_caption", "caption"]] = ["re_caption", "caption"]


DEFAULT_SPACES = {
    "semantic": SpaceSettings(kind="image", model="openai/clip-vit-large-patch14"),
    "pattern": SpaceSettings(kind="image", model="facebook/dinov2-base"),
    "caption": SpaceSettings(kind="text", model="openai/clip-vit-large-patch14", max_length=77),
}


class EmbedSettings(StageSettings):
    spaces: dict[str, SpaceSettings] = DEFAULT_SPACES
    batch_size: int = Field(64, gt=0)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    decode_threads: int = Field(2, gt=0, description="PIL decode threads per worker (CPU path)")
    cpus: float = Field(1.0, gt=0)
    gpus: float | None = Field(None, ge=0, description="per worker; default 1 when the device is cuda")

    @model_validator(mode="after")
    def _names(self):
        for name in self.spaces:
            if not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"space name {name!r}: use letters, digits, - and _")
        if not self.spaces:
            raise ValueError("at least one space is needed")
        return self


class EmbedStage(Stage):
    name = "embed"
    Settings = EmbedSettings
    settings: EmbedSettings
    loads_model = True

    def resources(self) -> Resources:
        gpus = self.settings.gpus
        if gpus is None:
            gpus = 1.0 if resolve_device(self.settings.device).type == "cuda" else 0.0
        return Resources(cpus=self.settings.cpus, gpus=gpus)

    def check(self) -> None:
        for name, space in self.settings.spaces.items():
            check_model_path(space.model, f"embed.spaces.{name}.model")

    def plan(self) -> list[list[Unit]]:
        return [[Unit(s) for s in catalog.shards(self.inputs["catalog"])]]

    def setup(self) -> None:
        s = self.settings
        self.device = resolve_device(s.device)
        dtype = DTYPES[s.dtype]
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(s.cpus)))
        self.image_encoders = {n: ImageEncoder(sp.model, self.device, dtype, sp.pooling) for n, sp in s.spaces.items() if sp.kind == "image"}
        self.text_encoders = {
            n: TextEncoder(sp.model, self.device, dtype, sp.pooling, sp.max_length) for n, sp in s.spaces.items() if sp.kind == "text"
        }
        self.pool = ThreadPoolExecutor(s.decode_threads)

    def process(self, unit: Unit) -> Stats:
        table = catalog.read(self.inputs["catalog"], unit.id, columns=["id", "path", "offset", "size", "caption", "re_caption", "sha256"])
        stats = Stats(input=table.num_rows)
        refs = catalog.image_refs(table)
        ids = np.array([r.id for r in refs], dtype=object)
        hashes = np.array([embeddings.hash64(h) for h in table["sha256"].to_pylist()], dtype=np.uint64)

        ok = np.ones(len(refs), dtype=bool)
        image_vecs: dict[str, list[np.ndarray]] = {n: [] for n in self.image_encoders}
        if self.image_encoders:
            for start, images in self._decoded_batches(refs, stats):
                good = [i for i, img in enumerate(images) if img is not None]
                ok[[start + i for i in range(len(images)) if images[i] is None]] = False
                if good:
                    batch = [images[i] for i in good]
                    for name, enc in self.image_encoders.items():
                        image_vecs[name].append(enc(batch).cpu().numpy().astype(np.float16))
        stats.output = int(ok.sum())
        for name, chunks in image_vecs.items():
            vecs = np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float16)
            self._save(name, unit.id, ids[ok], hashes[ok], vecs)
            stats.counters[f"vectors.{name}"] += len(vecs)

        d = table.select(["caption", "re_caption"]).to_pydict()
        for name, enc in self.text_encoders.items():
            fields = self.settings.spaces[name].text_fields
            texts = [next((d[f][i] for f in fields if d[f][i]), None) for i in range(len(refs))]
            keep = [i for i, t in enumerate(texts) if t and ok[i]]
            vecs = self._embed_texts(enc, [texts[i] for i in keep])
            self._save(name, unit.id, ids[keep], hashes[keep], vecs)
            stats.counters[f"vectors.{name}"] += len(vecs)
            stats.counters[f"no_text.{name}"] += int(ok.sum()) - len(keep)
        return stats

    def _decoded_batches(self, refs, stats: Stats):
        """Batches of decoded uint8 CHW tensors; the next batch decodes while the current one runs."""
        bs = self.settings.batch_size
        starts = list(range(0, len(refs), bs))
        submit = lambda s: [self.pool.submit(_decode, r) for r in refs[s : s + bs]]  # noqa: E731
        pending = submit(starts[0]) if starts else []
        for k, start in enumerate(starts):
            current = pending
            if k + 1 < len(starts):
                pending = submit(starts[k + 1])
            images = []
            for fut in current:
                img, err = fut.result()
                if err:
                    stats.reject(err)
                images.append(img)
            yield start, images

    def _embed_texts(self, enc: TextEncoder, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 0), np.float16)
        order = np.argsort(enc.lengths(texts), kind="stable")  # similar lengths share a batch: less padding
        out = [None] * len(texts)
        bs = self.settings.batch_size
        for s in range(0, len(order), bs):
            idx = order[s : s + bs]
            vecs = enc([texts[i] for i in idx]).cpu().numpy().astype(np.float16)
            for i, v in zip(idx, vecs):
                out[i] = v
        return np.stack(out)

    def _save(self, space: str, shard: str, ids: np.ndarray, hashes: np.ndarray, vecs: np.ndarray) -> None:
        sp = self.settings.spaces[space]
        if len(vecs):
            embeddings.write_manifest(self.output, space, {"kind": sp.kind, "model": sp.model, "pooling": sp.pooling, "dim": int(vecs.shape[1])})
        embeddings.save(self.output, space, shard, ids, hashes, vecs)


def _decode(ref: catalog.ImageRef) -> tuple[torch.Tensor | None, str | None]:
    try:
        with Image.open(io.BytesIO(catalog.read_image_bytes(ref))) as img:
            rgb = np.asarray(img.convert("RGB"))
    except Exception:  # the catalog said it decoded; a changed source file is the likely cause
        return None, "decode_error"
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1), None
