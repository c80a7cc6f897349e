"""annotate: a relation description per pair (VLM, or a text LLM), then retrieval instructions (LLM).

Units are ranges of about `pairs_per_unit` pairs, whatever the layout of the pairs files.
The describer sees the query and target images with the caption each is known by (the caption
stage's table, `caption.use`) and writes about
WORD_NUM words (drawn per request from 60..100) on what they share and how the target
differs; a text describer (`describer.kind: text`) writes it from the two captions alone, plus
the images' `attributes` when the corpus keeps them (`corpus.keep_fields`), and no image is
loaded. The instructor turns that description into
`instructions_per_pair` instructions, prompted with demonstrations drawn per request from
the pool. Every answer is validated; a failing one is retried with a fresh seed, then the
pair is rejected with the reason. A pair whose image cannot be read or decoded is rejected
as `image_unreadable`. Pairs go through in chunks (`describe_chunk`), each described then
instructed before the next, so the answer cache holds every finished chunk's work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Literal

from PIL import Image
from pydantic import Field, field_validator, model_validator

from stages import annotations, captions, catalog, pairs, units
from stages.annotation import prompts
from stages.annotation.backends import (
    ChatRequest, GeneratorSettings, OpenAISettings, TransformersSettings, VLLMSettings, api_key, backend_union,
    check_endpoint, check_transport, gpus_needed, make_generator,
)  # fmt: skip
from stages.annotation.asking import Asker
from stages.annotation.cache import AnswerCache, reused_cache
from stages.annotation.validate import Bounds, Language, Rules, WordBounds, check_description, parse_instructions
from stages.base import Resources, Stage, StageSettings, Stats, Unit, atomic_path, is_transient
from stages.images import open_image
from stages.models.encoders import check_model_path

log = logging.getLogger("megasynth.annotate")

# Marks a setting that names a file: `pipeline.config` resolves it relative to the config file where it is written.
CONFIG_RELATIVE = {"relative_to_config": True}

# What reading or decoding one catalogued image can raise (PIL.UnidentifiedImageError is an OSError).
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


DescriberKind = Literal["vision", "text"]
KIND = Field("vision", description=(
    "vision: a VLM shown both images and their captions; text: a text LLM that writes the description from the two "
    "captions (and the images' `attributes` when the corpus keeps them), no image loaded: for machines without a VLM, "
    "and an ablation against the VLM"))  # fmt: skip
DESCRIBE_TEXT_PROMPT = "describe-text-v1"  # a text describer's default prompt


class TransformersDescriber(TransformersSettings):
    kind: DescriberKind = KIND


class OpenAIDescriber(OpenAISettings):
    kind: DescriberKind = KIND


class VLLMDescriber(VLLMSettings):
    kind: DescriberKind = KIND


DescriberSettings = backend_union(TransformersDescriber, OpenAIDescriber, VLLMDescriber)


class AnnotateSettings(StageSettings):
    describer: DescriberSettings = TransformersDescriber(model="Qwen/Qwen2-VL-7B-Instruct", max_new_tokens=192)
    instructor: GeneratorSettings = TransformersSettings(model="meta-llama/Meta-Llama-3-8B-Instruct", max_new_tokens=160)
    describe_prompt: str = Field("describe-v1", json_schema_extra=CONFIG_RELATIVE, description=(
        "a packaged prompt (describe-v1; describe-text-v1, the default of a text describer) or a .txt template of "
        "your own, relative to the config file that names it; its fields: {query_caption}, {target_caption}, "
        "{query_attributes}, {target_attributes}, {word_num}"))
    describe_attributes: list[str] | None = Field(None, description=(
        "the keys of an image's `attributes` (a field kept by corpus.keep_fields) that {query_attributes} and "
        "{target_attributes} show, in this order; default: all of them"))
    instruct_prompt: str = Field("instruct-v1", json_schema_extra=CONFIG_RELATIVE, description=(
        "a packaged prompt (instruct-v1) or a .txt template of your own, relative to the config file that names it; "
        "its fields: {description} (required), {demonstrations}, {n}"))
    instructions_per_pair: int = Field(3, gt=0, le=20)
    demonstrations: int = Field(5, ge=0, description="drawn per request from the pool")
    demonstrations_file: str | None = Field(None, json_schema_extra=CONFIG_RELATIVE, description=(
        'JSONL pool, one {"description": ..., "instructions": [...]} per line, relative to the config file that names it; '
        "default: the project's 50"))
    retries: int = Field(2, ge=0, description="new-seed attempts after a rejected answer")
    image_side: int = Field(448, gt=0, description="longer side of the images shown to the describer")
    describe_chunk: int = Field(256, gt=0, description="pairs described per call to the backend (their images stay in memory)")
    pairs_per_unit: int = Field(10_000, gt=0, description="pairs per annotate unit: several units per worker keep every GPU busy")
    description_words: WordBounds = Field((20, 160), description="bounds of a description, in words (Chinese, Japanese: characters)")
    instruction_words: WordBounds = Field((4, 40), description="bounds of each instruction, in words (Chinese, Japanese: characters)")
    language: Language = Field("en", description="ISO 639-1 code of the language answers must be written in (your prompts ask "
                                            "for it); answers in another are rejected as wrong_language")
    banned_phrases_file: str | None = Field(None, json_schema_extra=CONFIG_RELATIVE, description=(
        "phrases no description or instruction may hold (whole words, any case), one per line, # for comments; "
        "relative to the config file that names it"))
    cache: bool = Field(True, description="reuse raw answers keyed by request, model, sampling and seed")
    cache_dir: str | None = Field(None, description="where the answer cache lives (one folder that all workers of all nodes "
                                                    "share; runs pointed at one folder share answers); default: the run folder's cache/")
    seed: int | None = None
    cpus: float = Field(1.0, gt=0)
    gpus: float | None = Field(None, ge=0, description="per worker; default: what the backends need")

    @model_validator(mode="before")
    @classmethod
    def _describer_settings(cls, data):
        """A describer given as plain generator settings (TransformersSettings(...)) is a vision one; a text describer
        left on the default prompt gets the one written for it."""
        if not isinstance(data, dict):
            return data
        d = data.get("describer")
        if isinstance(d, (TransformersSettings, OpenAISettings, VLLMSettings)) and not hasattr(d, "kind"):
            data = {**data, "describer": {"backend": d.backend, **{k: getattr(d, k) for k in d.model_fields_set}}}
        if "describe_prompt" not in data and _kind_of(data.get("describer")) == "text":
            data = {**data, "describe_prompt": DESCRIBE_TEXT_PROMPT}
        return data

    @field_validator("describe_prompt")
    @classmethod
    def _describe_template(cls, v: str) -> str:
        prompts.check_template(prompts.load_prompt(v), prompts.DESCRIBE_FIELDS)
        return v

    @model_validator(mode="after")
    def _describer_sees_its_prompt(self) -> "AnnotateSettings":
        if self.describer.kind != "text":
            return self
        template = prompts.load_prompt(self.describe_prompt)
        if template.name in prompts.VISION_PROMPTS:
            raise ValueError(f"describe_prompt {template.name!r} speaks of the images shown with it, and a text describer "
                             f"(describer.kind: text) is shown none: use {DESCRIBE_TEXT_PROMPT!r} or a prompt of your own")  # fmt: skip
        for image in ("query", "target"):
            if not {f"{image}_caption", f"{image}_attributes"} & template.fields():
                raise ValueError(f"describe_prompt {template.name!r}: a text describer knows the {image} image only from "
                                 f"{{{image}_caption}} or {{{image}_attributes}}, and the prompt has neither")  # fmt: skip
        return self

    @field_validator("instruct_prompt")
    @classmethod
    def _instruct_template(cls, v: str) -> str:
        prompts.check_template(prompts.load_prompt(v), prompts.INSTRUCT_FIELDS, required={"description"})
        return v

    @field_validator("demonstrations_file")
    @classmethod
    def _demonstrations_load(cls, v: str | None) -> str | None:
        if v is not None:
            prompts.load_demonstrations(v)
        return v

    @field_validator("banned_phrases_file")
    @classmethod
    def _phrases_load(cls, v: str | None) -> str | None:
        if v is not None:
            prompts.load_phrases(v)
        return v

    @model_validator(mode="after")
    def _demonstrations_shown(self) -> "AnnotateSettings":
        if self.demonstrations and "demonstrations" not in prompts.load_prompt(self.instruct_prompt).fields():
            raise ValueError(f"instruct_prompt {self.instruct_prompt!r} has no {{demonstrations}} field, so the "
                             f"{self.demonstrations} demonstrations would never be shown; add it, or set demonstrations: 0")
        return self

    def user_files(self) -> list[str]:
        """The files of the team's own that decide answers (prompts, demonstrations, banned phrases)."""
        prompt_files = [p for p in (self.describe_prompt, self.instruct_prompt) if prompts.is_file(p)]
        return prompt_files + [f for f in (self.demonstrations_file, self.banned_phrases_file) if f]

    def rules(self, template: prompts.PromptTemplate) -> Rules:
        banned = prompts.load_phrases(self.banned_phrases_file) if self.banned_phrases_file else ()
        return Rules(language=self.language, banned=banned, prompt=template.text)


def request_seed(seed: int, pair_id: str, step: str, attempt: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{pair_id}:{step}:{attempt}".encode(), digest_size=6).digest(), "big")


class AnnotateStage(Stage):
    name = "annotate"
    Settings = AnnotateSettings
    settings: AnnotateSettings
    version = "3"  # 3: describer kind (vision, text) per row; 2: validation judges content (self-contradictions out; any names for the two images in)
    loads_model = True
    reject_hint = ("Check the describer and instructor (annotate.describer / annotate.instructor: model, backend, prompts) "
                   "and the validation bounds; `megasynth sample` and the cached answers show what they wrote")  # fmt: skip

    def resources(self) -> Resources:
        s = self.settings
        gpus = s.gpus if s.gpus is not None else max(gpus_needed(s.describer), gpus_needed(s.instructor))
        engines = [g.tensor_parallel_size for g in (s.describer, s.instructor) if g.backend == "vllm" and g.tensor_parallel_size > 1]
        return Resources(cpus=s.cpus, gpus=gpus, engine_gpus=max(engines, default=0))

    def fingerprint_extra(self) -> dict:
        files = self.settings.user_files()  # their paths are settings; an edit in place must rerun the stage too
        return {"user_files": prompts.files_digest(files)} if files else {}

    def environment(self) -> list[str]:
        steps = (self.settings.describer, self.settings.instructor)
        return sorted({g.api_key_env for g in steps if g.backend == "openai" and g.api_key_env})

    def check(self) -> None:
        listing: dict = {}  # one model listing per server, whichever steps it serves
        for step in ("describer", "instructor"):
            g = getattr(self.settings, step)
            if g.backend == "openai":
                try:
                    api_key(g)
                    check_transport(g)
                    check_endpoint(g, listing)  # a dead or refusing endpoint is one line now, not after hours of embedding
                except ValueError as e:
                    raise ValueError(f"annotate.{step}.{e}") from None
            else:
                check_model_path(g.model, f"annotate.{step}.model")
        if self.settings.demonstrations and not self._demos():
            raise ValueError("annotate.demonstrations_file: the demonstration pool is empty")

    def _demos(self) -> tuple[prompts.Demonstration, ...]:
        return prompts.load_demonstrations(self.settings.demonstrations_file)

    def plan(self) -> list[list[Unit]]:
        counts = units.row_counts(self.inputs["pairs"], pairs.units(self.inputs["pairs"]))
        sliced = units.slice_rows(counts, self.settings.pairs_per_unit)
        return [[Unit(f"pairs-{i:05d}", {"slices": sl}, items=units.unit_rows(sl)) for i, sl in enumerate(sliced)]]

    def setup(self) -> None:
        import torch

        torch.set_num_threads(max(1, int(self.settings.cpus)))  # same threads, same numbers, on any executor
        self.describer = make_generator(self.settings.describer, vision=self.settings.describer.kind == "vision", workers=self.worker_count)
        self.instructor = make_generator(self.settings.instructor, vision=False, workers=self.worker_count)
        cache = None
        if self.settings.cache:
            folder = Path(self.settings.cache_dir).expanduser() if self.settings.cache_dir else self.inputs["cache"]
            cache = AnswerCache(folder, read_also=[reused_cache(run) for run in self.reuse_runs])
        self.asker = Asker(cache, self.settings.retries)

    def process(self, unit: Unit) -> Stats:
        s = self.settings
        rows = units.read_slices(self.inputs["pairs"], unit.payload["slices"]).to_pylist()
        stats = Stats(input=len(rows))
        self.asker.counters = stats.counters  # answers generated vs read from the cache, per step: what a variant cost
        ids = {r["query_id"] for r in rows} | {r["target_id"] for r in rows}
        meta = catalog.lookup(self.inputs["catalog"], ids, ["path", "offset", "size", "caption", "re_caption", "meta"])
        known_as = captions.lookup(self.inputs["captions"], ids, ["text"])  # the one caption each image is known by
        for image_id, m in meta.items():
            m["known_as"] = (known_as.get(image_id) or {}).get("text") or ""
        prompt_names = {"describe_prompt": prompts.load_prompt(s.describe_prompt).name,  # a file's: name@digest
                        "instruct_prompt": prompts.load_prompt(s.instruct_prompt).name}
        for r in rows:
            r.update(status=annotations.OK, error=None, description=None, instructions=None, seed=s.seed,
                     describe_attempts=0, instruct_attempts=0, describer=self.describer.model_name, describer_kind=s.describer.kind,
                     instructor=self.instructor.model_name, **prompt_names,
                     word_num=None)
            if r["query_id"] not in meta or r["target_id"] not in meta:
                self._reject(r, "image_not_in_catalog")
        todo = [r for r in rows if r["status"] == annotations.OK]
        # Describe, then instruct, one chunk at a time: decoded images are held for one chunk only, and
        # a chunk's answers reach the cache before the next chunk starts (a late failure loses one chunk).
        for i in range(0, len(todo), s.describe_chunk):
            chunk = todo[i : i + s.describe_chunk]
            self._describe(chunk, meta)
            self._instruct([r for r in chunk if r["status"] == annotations.OK], meta)
            self.advance(len(chunk))
        for r in rows:
            if r["status"] == annotations.OK:
                stats.output += 1
            else:
                stats.reject(r["error"])
        with atomic_path(self.output / f"{unit.id}.parquet") as tmp:
            annotations.write(tmp, rows)
        return stats

    def _describe(self, rows: list[dict], meta: dict) -> None:
        """Loads the rows' images first (a pair with an unreadable image is rejected), then describes the rest.
        A text describer is shown no images, so none are loaded."""
        s = self.settings
        template = prompts.load_prompt(s.describe_prompt)
        bounds = Bounds(*s.description_words)
        vision = s.describer.kind == "vision"
        images = self._load_images(rows, meta) if vision else {}
        rows = [r for r in rows if r["status"] == annotations.OK]

        def request(r: dict, attempt: int) -> ChatRequest:
            seed = request_seed(s.seed, r["pair_id"], "describe", attempt)
            r["word_num"] = prompts.draw_word_num(random.Random(seed))
            q, t = meta[r["query_id"]], meta[r["target_id"]]
            text = prompts.describe_text(template, q["known_as"], t["known_as"], r["word_num"],
                                         _attributes(q, s.describe_attributes), _attributes(t, s.describe_attributes))  # fmt: skip
            return ChatRequest(text, (images[q["id"]], images[t["id"]]) if vision else (), seed)

        rules = s.rules(template)

        def accept(r: dict, answer: str) -> None:
            r["description"] = check_description(answer, bounds, rules)

        self.asker.with_retries(rows, "describe", self.describer, s.describer, request, accept, self._reject)

    def _instruct(self, rows: list[dict], meta: dict) -> None:
        s = self.settings
        template = prompts.load_prompt(s.instruct_prompt)
        bounds = Bounds(*s.instruction_words)
        pool = self._demos()
        rules = s.rules(template)
        shown: dict[str, list[str]] = {}  # pair id -> the demonstrations' instructions in its latest request

        def request(r: dict, attempt: int) -> ChatRequest:
            seed = request_seed(s.seed, r["pair_id"], "instruct", attempt)
            demos = prompts.draw_demonstrations(pool, s.demonstrations, random.Random(seed))
            shown[r["pair_id"]] = [line for d in demos for line in d.instructions]
            return ChatRequest(prompts.instruct_text(template, r["description"], demos, s.instructions_per_pair), (), seed)

        def accept(r: dict, answer: str) -> None:
            t = meta[r["target_id"]]
            r["instructions"] = parse_instructions(answer, s.instructions_per_pair, bounds, [t["known_as"], t["caption"], t["re_caption"]],
                                                   rules, shown[r["pair_id"]])  # fmt: skip

        self.asker.with_retries(rows, "instruct", self.instructor, s.instructor, request, accept, self._reject)

    @staticmethod
    def _reject(r: dict, reason: str) -> None:
        r["status"], r["error"] = annotations.REJECTED, reason

    def _load_images(self, rows: list[dict], meta: dict) -> dict[str, Image.Image]:
        """The decoded images of `rows` by id; a pair whose query or target cannot be read or decoded is rejected."""
        images: dict[str, Image.Image | None] = {}
        for r in rows:
            for image_id in (r["query_id"], r["target_id"]):
                if image_id not in images:
                    try:
                        images[image_id] = self._image(meta[image_id])
                    except IMAGE_ERRORS as e:  # the catalog said it decoded: a changed or damaged source is the likely cause
                        if is_transient(e):  # EIO, ESTALE, a file briefly missing: the unit is retried, the pair not rejected
                            raise
                        log.warning("annotate: cannot read image %s: %s: %s", image_id, type(e).__name__, e)
                        images[image_id] = None
            if images[r["query_id"]] is None or images[r["target_id"]] is None:
                self._reject(r, "image_unreadable")
        return {k: v for k, v in images.items() if v is not None}

    def _image(self, row: dict) -> Image.Image:
        ref = catalog.ImageRef(row["id"], row["path"], row["offset"], row["size"])
        data = catalog.read_image_bytes(ref)
        img = open_image(data)
        img.thumbnail((self.settings.image_side, self.settings.image_side), Image.Resampling.BICUBIC)
        img.info["megasynth_digest"] = f"{hashlib.sha256(data).hexdigest()}:{self.settings.image_side}"  # the cache key's image part
        return img


def _kind_of(describer) -> str:
    """The kind of a describer's settings, as written (a mapping) or as built."""
    return describer.get("kind", "vision") if isinstance(describer, dict) else getattr(describer, "kind", "vision")


def _attributes(row: dict, keys: list[str] | None) -> str:
    """An image's `attributes` kept from its corpus (the catalog's `meta`), as the describer is shown them; "" if none."""
    kept = json.loads(row["meta"]) if row.get("meta") else {}
    attributes = kept.get("attributes") if isinstance(kept, dict) else None
    if not isinstance(attributes, dict):
        return prompts.attributes_text(attributes) if attributes else ""
    chosen = attributes if keys is None else {k: attributes[k] for k in keys if k in attributes}
    return prompts.attributes_text(chosen)
