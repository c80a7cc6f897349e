"""caption: a caption for every image that lacks one (or for all of them), and the one caption each image is known by.

Recap-DataComp itself was re-captioned by a VLM: `caption.mode: all` with a chosen captioner regenerates
that step; `missing` (the default) fills the gaps of a corpus such as a folder of bare images; `off`
generates nothing. In every mode the stage writes the caption table (`stages/captions.py`) that the later
stages read: per accepted catalog row, the caption chosen by one rule (`choose_caption`) and where it came
from. Generated captions go through the same backends, answer cache, validation, retries and rejection
reasons as annotate's answers. One unit per catalog shard; the captioner is loaded only by a worker that
meets an image needing a caption, so a corpus whose images all have captions costs a read of its text.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Literal

from PIL import Image
from pydantic import Field, field_validator, model_validator

from stages import captions, catalog
from stages.annotation import prompts
from stages.annotation.asking import Asker
from stages.annotation.backends import ChatRequest, GeneratorSettings, api_key, check_endpoint, check_transport, gpus_needed, make_generator
from stages.annotation.cache import AnswerCache, reused_cache
from stages.annotation.validate import Bounds, Language, Rules, WordBounds, check_caption
from stages.base import Resources, Stage, StageSettings, Stats, Unit, atomic_path, is_transient
from stages.images import open_image
from stages.models.encoders import check_model_path

log = logging.getLogger("megasynth.caption")

CONFIG_RELATIVE = {"relative_to_config": True}
PROMPT_FIELDS = {"caption"}  # a caption prompt may show the image's corpus caption (alt text) as a hint
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
CaptionField = Literal["re_caption", "caption"]


class CaptionSettings(StageSettings):
    mode: Literal["off", "missing", "all"] = Field("missing", description=(
        "off: no caption is generated; missing: images without one of the `use` fields get one from the captioner; "
        "all: every image gets a generated caption, which is then the one used (Recap-DataComp's re-captioning)"))
    use: list[CaptionField] = Field(["re_caption", "caption"], min_length=1, description=(
        "the corpus's caption fields, in order of preference: an image's caption is the first non-empty one, else "
        "its generated caption; embed's text spaces and the describer both use it, and the card records the rule"))
    captioner: GeneratorSettings | None = Field(None, description=(
        "the VLM that writes captions (backends as in annotate: transformers, vllm, openai); none: images without "
        "a caption stay without one and are counted as uncaptioned"))
    prompt: str = Field("caption-v1", json_schema_extra=CONFIG_RELATIVE, description=(
        "a packaged prompt (caption-v1) or a .txt template of your own, relative to the config file that names it; "
        "its field: {caption} (the image's corpus caption, or (none))"))
    words: WordBounds = Field((5, 80), description="bounds of a generated caption, in words (Chinese, Japanese: characters)")
    language: Language = Field("en", description="ISO 639-1 code of the language captions must be written in")
    retries: int = Field(2, ge=0, description="new-seed attempts after a rejected caption")
    image_side: int = Field(448, gt=0, description="longer side of the image shown to the captioner")
    chunk: int = Field(256, gt=0, description="images captioned per call to the backend (their pixels stay in memory)")
    cache: bool = Field(True, description="reuse raw answers keyed by request, model, sampling and seed (the run's cache/)")
    cache_dir: str | None = Field(None, description="where the answer cache lives; default: the run folder's cache/")
    seed: int | None = None
    cpus: float = Field(1.0, gt=0)
    gpus: float | None = Field(None, ge=0, description="per worker; default: what the captioner's backend needs")

    @field_validator("prompt")
    @classmethod
    def _template(cls, v: str) -> str:
        prompts.check_template(prompts.load_prompt(v), PROMPT_FIELDS)
        return v

    @model_validator(mode="after")
    def _captioner_for_all(self) -> "CaptionSettings":
        if self.mode == "all" and self.captioner is None:
            raise ValueError("mode all regenerates every caption: name a caption.captioner (model and backend)")
        return self

    @property
    def generates(self) -> bool:
        return self.mode != "off" and self.captioner is not None


def needs_caption(row: dict, use: list[str], mode: str) -> bool:
    """Whether the captioner is asked for this image: all of them in mode all; in mode missing, those without a `use` field."""
    return mode == "all" or (mode == "missing" and not any(row.get(f) for f in use))


def choose_caption(row: dict, use: list[str], mode: str, generated: str | None) -> tuple[str | None, str | None]:
    """The image's caption and its source: the generated one in mode all; else the first non-empty `use` field;
    else the generated one; else none."""
    if mode == "all" and generated:
        return generated, captions.GENERATED
    for f in use:
        if row.get(f):
            return row[f], f
    if generated:
        return generated, captions.GENERATED
    return None, None


def caption_seed(seed: int, image_id: str, attempt: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{image_id}:caption:{attempt}".encode(), digest_size=6).digest(), "big")


class CaptionStage(Stage):
    name = "caption"
    Settings = CaptionSettings
    settings: CaptionSettings
    version = "1"
    reject_hint = ("Check the captioner (caption.captioner: model, backend, caption.prompt) and caption.words; the cached "
                   "answers under the run's cache/ show what it wrote")  # fmt: skip

    @classmethod
    def holds_model(cls, settings: CaptionSettings) -> bool:
        return settings.generates  # a long-lived worker keeps the captioner between shards; else short tasks

    def resources(self) -> Resources:
        s = self.settings
        if not s.generates:
            return Resources(cpus=1.0)
        gpus = s.gpus if s.gpus is not None else gpus_needed(s.captioner)
        engine = s.captioner.tensor_parallel_size if s.captioner.backend == "vllm" and s.captioner.tensor_parallel_size > 1 else 0
        return Resources(cpus=s.cpus, gpus=gpus, engine_gpus=engine)

    def reuse_key(self) -> dict:
        s = self.settings
        if s.generates:
            return s.model_dump(mode="json", exclude={"cache", "cache_dir", "chunk", "cpus", "gpus"})
        return {"mode": s.mode, "use": s.use}  # nothing generated: only the rule decides the table

    def fingerprint_extra(self) -> dict:
        if self.settings.generates and prompts.is_file(self.settings.prompt):
            return {"user_files": prompts.files_digest([self.settings.prompt])}
        return {}

    def environment(self) -> list[str]:
        g = self.settings.captioner
        return [g.api_key_env] if self.settings.generates and g.backend == "openai" and g.api_key_env else []

    def check(self) -> None:
        if not self.settings.generates:
            return
        g = self.settings.captioner
        if g.backend == "openai":
            try:
                api_key(g)
                check_transport(g)
                check_endpoint(g, {})
            except ValueError as e:
                raise ValueError(f"caption.captioner.{e}") from None
        else:
            check_model_path(g.model, "caption.captioner.model")

    def plan(self) -> list[list[Unit]]:
        folder = self.inputs["catalog"]
        return [[Unit(s, items=catalog.ok_count(folder, s)) for s in catalog.shards(folder)]]

    def setup(self) -> None:
        self.captioner = None  # loaded on the first image that needs a caption
        cache = None
        if self.settings.cache and self.settings.generates:
            folder = Path(self.settings.cache_dir).expanduser() if self.settings.cache_dir else self.inputs["cache"]
            cache = AnswerCache(folder, read_also=[reused_cache(run, "caption") for run in self.reuse_runs])
        self.asker = Asker(cache, self.settings.retries)

    def process(self, unit: Unit) -> Stats:
        s = self.settings
        table = catalog.read(self.inputs["catalog"], unit.id, columns=["id", "path", "offset", "size", "sha256", "caption", "re_caption"])
        rows = table.to_pylist()
        stats = Stats(input=len(rows))
        self.asker.counters = stats.counters
        for r in rows:
            r.update(generated=None, error=None, caption_attempts=0)
        todo = [r for r in rows if s.generates and needs_caption(r, s.use, s.mode)]
        for i in range(0, len(todo), s.chunk):
            self._caption(todo[i : i + s.chunk])
            self.advance(len(todo[i : i + s.chunk]))
        out = []
        for r in rows:
            text, source = choose_caption(r, s.use, s.mode, r["generated"])
            generated = source == captions.GENERATED
            out.append({"id": r["id"], "text": text, "source": source, "model": s.captioner.model if generated else None,
                        "prompt": prompts.load_prompt(s.prompt).name if generated else None, "error": r["error"],
                        "attempts": r["caption_attempts"]})  # fmt: skip
            if r["error"]:
                stats.reject(r["error"])
            elif text is None:
                stats.counters["uncaptioned"] += 1  # no caption and none asked for (mode off, or no captioner)
            else:
                stats.output += 1
            if source:
                stats.counters[f"from.{source}"] += 1
        with atomic_path(captions.caption_file(self.output, unit.id)) as tmp:
            captions.write(tmp, out)
        return stats

    def _caption(self, rows: list[dict]) -> None:
        s = self.settings
        if self.captioner is None:
            self.captioner = make_generator(s.captioner, vision=True, workers=self.worker_count)
        template = prompts.load_prompt(s.prompt)
        bounds, rules = Bounds(*s.words), Rules(language=s.language, prompt=template.text)
        images = {}
        for r in rows:
            try:
                images[r["id"]] = self._image(r)
            except IMAGE_ERRORS as e:  # ingest decoded it: a changed or damaged source is the likely cause
                if is_transient(e):
                    raise
                log.warning("caption: cannot read image %s: %s: %s", r["id"], type(e).__name__, e)
                r["error"] = "image_unreadable"
        rows = [r for r in rows if r["id"] in images]

        def request(r: dict, attempt: int) -> ChatRequest:
            text = template.render(caption=r["caption"] or r["re_caption"] or "(none)")
            return ChatRequest(text, (images[r["id"]],), caption_seed(s.seed or 0, r["id"], attempt))

        def accept(r: dict, answer: str) -> None:
            r["generated"] = check_caption(answer, bounds, rules)

        def reject(r: dict, reason: str) -> None:
            r["error"] = reason

        self.asker.with_retries(rows, "caption", self.captioner, s.captioner, request, accept, reject)

    def _image(self, row: dict) -> Image.Image:
        data = catalog.read_image_bytes(catalog.ImageRef(row["id"], row["path"], row["offset"], row["size"]))
        img = open_image(data)
        img.thumbnail((self.settings.image_side, self.settings.image_side), Image.Resampling.BICUBIC)
        img.info["megasynth_digest"] = f"{row['sha256']}:{self.settings.image_side}"  # the cache key's image part
        return img
