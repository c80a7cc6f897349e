"""embed: L2-normalised embeddings of every catalogued image, in several spaces.

One unit per catalog shard. Each image is decoded once for all image spaces; each image's
caption (the caption stage's choice, see `stages.captions`) goes through the text spaces sorted
by token length. Output:
one file per space and shard (see `stages.embeddings`).

Three things overlap so the models never wait: a thread pool reads (and, unless the GPU
decodes, PIL-decodes) the images of the next `prefetch` batches; one preparation thread
turns each batch into every tower's pixel tensor (nvJPEG decode when the device is cuda
and torchvision is installed, then resize, crop and normalise on the device, on its own
CUDA stream); the calling thread runs the models.
"""

from __future__ import annotations

import io
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field, model_validator

from stages import captions, catalog, embeddings
from stages.base import Resources, Stage, StageSettings, Stats, Unit, is_transient
from stages.images import ImageRejected, open_image, plain_jpeg
from stages.models.encoders import DTYPES, ImageEncoder, Pooling, TextEncoder, check_model_path, preprocess, resolve_device

JPEG_MAGIC = b"\xff\xd8\xff"
#: batches whose forwards may be queued on the GPU at once: enough to keep it busy, bounded memory
GPU_QUEUE = 2


class SpaceSettings(StageSettings):
    kind: Literal["image", "text"]
    model: str = Field(description="HF hub id or local folder, loaded with from_pretrained")
    pooling: Pooling = "auto"
    max_length: int = Field(128, gt=0, description="text spaces: tokens per caption")


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
    decode: Literal["auto", "pil"] = Field("auto", description="auto: nvJPEG on the GPU when the device is cuda and torchvision is installed; else PIL")
    decode_threads: int | None = Field(None, gt=0, description="threads that read and PIL-decode images; default: one per CPU of the worker")
    prefetch: int = Field(2, gt=0, description="batches read, decoded and preprocessed ahead of the one the models run")
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


@dataclass
class PreparedBatch:
    """One batch of images, ready for the towers: which decoded, and each tower's pixels."""

    start: int
    ok: list[bool]
    pixels: dict[str, torch.Tensor]
    rejected: Counter
    counters: Counter
    ready: torch.cuda.Event | None  # recorded on the preparation stream after the pixels are written


class EmbedStage(Stage):
    name = "embed"
    Settings = EmbedSettings
    settings: EmbedSettings
    loads_model = True

    def resources(self) -> Resources:
        return Resources.of(self.settings.cpus, self.settings.gpus, resolve_device(self.settings.device).type == "cuda")

    def check(self) -> None:
        for name, space in self.settings.spaces.items():
            check_model_path(space.model, f"embed.spaces.{name}.model")

    def plan(self) -> list[list[Unit]]:
        return [[Unit(s) for s in catalog.shards(self.inputs["catalog"])]]

    def setup(self) -> None:
        s = self.settings
        self.device = resolve_device(s.device)
        dtype = DTYPES[s.dtype]
        cpus = max(1, int(s.cpus))
        if self.device.type == "cpu":
            torch.set_num_threads(cpus)
        self.image_encoders = {n: ImageEncoder(sp.model, self.device, dtype, sp.pooling) for n, sp in s.spaces.items() if sp.kind == "image"}
        self.text_encoders = {
            n: TextEncoder(sp.model, self.device, dtype, sp.pooling, sp.max_length) for n, sp in s.spaces.items() if sp.kind == "text"
        }
        on_gpu = self.device.type == "cuda"
        self.nvjpeg = nvjpeg_decoder(self.device) if on_gpu and s.decode == "auto" and self.image_encoders else None
        self.decode_threads = s.decode_threads or cpus
        self.pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="embed-read")
        self.prep = ThreadPoolExecutor(1, thread_name_prefix="embed-prepare")  # one thread: batches come out in order
        self.stream = torch.cuda.Stream(self.device) if on_gpu else None

    def process(self, unit: Unit) -> Stats:
        table = catalog.read(self.inputs["catalog"], unit.id, columns=["id", "path", "offset", "size", "sha256"])
        stats = Stats(input=table.num_rows)
        refs = catalog.image_refs(table)
        ids = np.array([r.id for r in refs], dtype=object)
        hashes = np.array([embeddings.hash64(h) for h in table["sha256"].to_pylist()], dtype=np.uint64)

        ok = np.ones(len(refs), dtype=bool)
        image_vecs = self._embed_images(refs, ok, stats) if self.image_encoders else {}
        stats.output = int(ok.sum())
        for name, vecs in image_vecs.items():
            self._save(name, unit.id, ids[ok], hashes[ok], vecs)
            stats.counters[f"vectors.{name}"] += len(vecs)

        caption_of = captions.texts(self.inputs["captions"], unit.id) if self.text_encoders else {}
        texts = [caption_of.get(r.id) for r in refs]
        for name, enc in self.text_encoders.items():
            keep = [i for i, t in enumerate(texts) if t and ok[i]]
            vecs = self._embed_texts(enc, [texts[i] for i in keep])
            self._save(name, unit.id, ids[keep], hashes[keep], vecs)
            stats.counters[f"vectors.{name}"] += len(vecs)
            stats.counters[f"no_text.{name}"] += int(ok.sum()) - len(keep)
        return stats

    # --- images: read and decode -> prepare -> forward, overlapped ------------------------------

    def _embed_images(self, refs: list[catalog.ImageRef], ok: np.ndarray, stats: Stats) -> dict[str, np.ndarray]:
        """Every tower's vectors for the images that decode (`ok` is cleared for the others)."""
        chunks: dict[str, list[torch.Tensor]] = {n: [] for n in self.image_encoders}
        queued: deque[torch.cuda.Event] = deque()
        for batch in self._prepared_batches(refs):
            stats.rejected.update(batch.rejected)
            stats.counters.update(batch.counters)
            ok[batch.start : batch.start + len(batch.ok)] = batch.ok
            if not batch.pixels:
                continue
            self._adopt(batch)
            for name, enc in self.image_encoders.items():
                chunks[name].append(enc.embed(batch.pixels[name]))
            if self.stream is not None:
                queued.append(torch.cuda.Event())
                queued[-1].record()
                if len(queued) > GPU_QUEUE:  # wait for an older batch, never for the one just queued
                    queued.popleft().synchronize()
        return {n: _to_fp16(c, self.image_encoders[n]) for n, c in chunks.items()}

    def _prepared_batches(self, refs: list[catalog.ImageRef]) -> Iterator[PreparedBatch]:
        """Batches in order; while one is yielded, the next `prefetch` are being read and prepared."""
        bs, ahead = self.settings.batch_size, self.settings.prefetch
        pending: deque[Future] = deque()
        for start in range(0, len(refs), bs):
            loads = [self.pool.submit(self._load, r) for r in refs[start : start + bs]]
            pending.append(self.prep.submit(self._prepare, start, loads))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def _load(self, ref: catalog.ImageRef) -> tuple[torch.Tensor | bytearray | None, str | None]:
        """One image, read; PIL-decoded here unless nvJPEG will decode it (then its bytes)."""
        try:
            data = catalog.read_image_bytes(ref)
        except OSError as e:  # the catalog said it decoded; a changed source file is the likely cause
            if is_transient(e):  # EIO, ESTALE, a file briefly missing: the unit is retried, the image not rejected
                raise
            return None, "decode_error"
        if self.nvjpeg is not None and data[:3] == JPEG_MAGIC and plain_jpeg(data):  # others need open_image's rules
            return bytearray(data), None
        return decode_pil(data)

    def _prepare(self, start: int, loads: list[Future]) -> PreparedBatch:
        """Runs on the preparation thread: decode what is left to decode, then every tower's pixels."""
        items = [f.result() for f in loads]
        images = [img for img, _ in items]
        rejected = Counter(err for _, err in items if err)
        counters: Counter = Counter()
        with torch.cuda.stream(self.stream) if self.stream is not None else nullcontext():
            if self.nvjpeg is not None:
                self._decode_batched(images, rejected, counters)
            good = [img for img in images if img is not None]
            pixels = preprocess(self.image_encoders, good) if good else {}
            ready = None
            if self.stream is not None:
                ready = torch.cuda.Event()
                ready.record(self.stream)
        return PreparedBatch(start, [img is not None for img in images], pixels, rejected, counters, ready)

    def _decode_batched(self, images: list, rejected: Counter, counters: Counter) -> None:
        """Replace the JPEG bytes in `images` by tensors nvJPEG decoded on the device; PIL takes what it refuses."""
        at = [i for i, img in enumerate(images) if isinstance(img, bytearray)]
        if pil := sum(1 for img in images if isinstance(img, torch.Tensor)):  # not JPEG: decoded by the pool
            counters["decode.pil"] += pil
        if not at:
            return
        if self.stream is not None:  # nvJPEG writes on its own stream into memory our stream freed: finish our earlier work
            self.stream.synchronize()
        decoded = decode_jpegs(self.nvjpeg, [torch.frombuffer(images[i], dtype=torch.uint8) for i in at])
        for i, img in zip(at, decoded):
            if img is None:
                img, err = decode_pil(bytes(images[i]))
                counters["decode.pil_fallback"] += 1
                if err:
                    rejected[err] += 1
            else:
                counters["decode.nvjpeg"] += 1
            images[i] = img

    def _adopt(self, batch: PreparedBatch) -> None:
        """Make the models' stream wait for the preparation stream, and keep the pixels alive until it is done."""
        if batch.ready is None:
            return
        current = torch.cuda.current_stream(self.device)
        current.wait_event(batch.ready)
        for pixels in batch.pixels.values():
            pixels.record_stream(current)

    # --- captions -------------------------------------------------------------------------------

    def _embed_texts(self, enc: TextEncoder, texts: list[str]) -> np.ndarray:
        if not texts:
            return _to_fp16([], enc)
        order = np.argsort(enc.lengths(texts), kind="stable")  # similar lengths share a batch: less padding
        bs = self.settings.batch_size
        sorted_vecs = _to_fp16([enc([texts[i] for i in order[s : s + bs]]) for s in range(0, len(order), bs)], enc)
        out = np.empty_like(sorted_vecs)
        out[order] = sorted_vecs
        return out

    def _save(self, space: str, shard: str, ids: np.ndarray, hashes: np.ndarray, vecs: np.ndarray) -> None:
        sp = self.settings.spaces[space]
        # written only when absent or different (see write_manifest); an empty shard's (0, dim) vectors carry the dim too
        embeddings.write_manifest(self.output, space, {"kind": sp.kind, "model": sp.model, "pooling": sp.pooling, "dim": int(vecs.shape[1])})
        embeddings.save(self.output, space, shard, ids, hashes, vecs)


def _to_fp16(chunks: list[torch.Tensor], enc: ImageEncoder | TextEncoder) -> np.ndarray:
    """Device float32 batches -> one fp16 array: a single device-to-host copy per space and shard.

    No batches (nothing in the shard to embed in this space): shape (0, the encoder's dim), so an empty
    shard's file has the space's width like any other.
    """
    if not chunks:
        return np.zeros((0, enc.dim), np.float16)
    return torch.cat(chunks).cpu().numpy().astype(np.float16)


def decode_pil(data: bytes) -> tuple[torch.Tensor | None, str | None]:
    """JPEG/PNG/WebP/... bytes -> uint8 RGB CHW tensor (opened as every stage opens images), or the rejection reason."""
    try:
        rgb = np.asarray(open_image(data))
    except ImageRejected as e:  # the catalog said it decoded; a changed source file is the likely cause
        return None, e.reason
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1), None


def nvjpeg_decoder(device: torch.device) -> Callable | None:
    """torchvision's batched nvJPEG decode on `device`, or None when torchvision is missing or cannot decode there."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None

    def decode(datas: list[torch.Tensor]) -> list[torch.Tensor]:
        return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)

    probe = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(probe, format="JPEG")
    try:  # a torchvision built without nvJPEG fails here, once, instead of on every batch
        decode([torch.frombuffer(bytearray(probe.getvalue()), dtype=torch.uint8)])
    except RuntimeError:
        return None
    return decode


def decode_jpegs(decode: Callable, datas: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """Decode a batch in one call; if it fails (one bad image fails them all), image by image, None where it fails."""
    try:
        return list(decode(datas))
    except RuntimeError:
        out = []
        for d in datas:
            try:
                out.append(decode([d])[0])
            except RuntimeError:
                out.append(None)
        return out
