"""annotate: a relation description per pair (VLM), then retrieval instructions (LLM).

Units are ranges of about `pairs_per_unit` pairs, whatever the layout of the pairs files.
The describer sees the query and target images with their captions and writes about
WORD_NUM words (drawn per request from 60..100) on what they share and how the target
differs; the instructor turns that description into
`instructions_per_pair` instructions, prompted with demonstrations drawn per request from
the pool. Every answer is validated; a failing one is retried with a fresh seed, then the
pair is rejected with the reason. A pair whose image cannot be read or decoded is rejected
as `image_unreadable`. Pairs go through in chunks (`describe_chunk`), each described then
instructed before the next, so the answer cache holds every finished chunk's work.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter
from pathlib import Path
from typing import Literal

from PIL import Image
from pydantic import Field, field_validator, model_validator

from stages import annotations, catalog, pairs, units
from stages.annotation import prompts
from stages.annotation.backends import (
    ChatRequest, Failed, GeneratorSettings, TransformersSettings, api_key, check_endpoint, check_transport, gpus_needed, make_generator,
)  # fmt: skip
from stages.annotation.cache import AnswerCache, request_key
from stages.annotation.validate import Bounds, Invalid, Rules, check_description, parse_instructions
from stages.base import Resources, Stage, StageSettings, Stats, Unit, atomic_path, is_transient
from stages.images import open_image
from stages.models.encoders import check_model_path

log = logging.getLogger("megasynth.annotate")

# Marks a setting that names a file: `pipeline.config` resolves it relative to the config file where it is written.
CONFIG_RELATIVE = {"relative_to_config": True}

# What reading or decoding one catalogued image can raise (PIL.UnidentifiedImageError is an OSError).
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class AnnotateSettings(StageSettings):
    describer: GeneratorSettings = TransformersSettings(model="Qwen/Qwen2-VL-7B-Instruct", max_new_tokens=192)
    instructor: GeneratorSettings = TransformersSettings(model="meta-llama/Meta-Llama-3-8B-Instruct", max_new_tokens=160)
    describe_prompt: str = Field("describe-v1", json_schema_extra=CONFIG_RELATIVE, description=(
        "a packaged prompt (describe-v1) or a .txt template of your own, relative to the config file that names it; "
        "its fields: {query_caption}, {target_caption}, {word_num}"))
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
    description_words: tuple[int, int] = Field((20, 160), description="bounds of a description, in words (Chinese, Japanese: characters)")
    instruction_words: tuple[int, int] = Field((4, 40), description="bounds of each instruction, in words (Chinese, Japanese: characters)")
    language: str = Field("en", description="ISO 639-1 code of the language answers must be written in (your prompts ask "
                                            "for it); answers in another are rejected as wrong_language")
    banned_phrases_file: str | None = Field(None, json_schema_extra=CONFIG_RELATIVE, description=(
        "phrases no description or instruction may hold (whole words, any case), one per line, # for comments; "
        "relative to the config file that names it"))
    caption_field: Literal["caption", "re_caption"] = "caption"
    cache: bool = Field(True, description="reuse raw answers keyed by request, model, sampling and seed")
    cache_dir: str | None = Field(None, description="where the answer cache lives (one folder that all workers of all nodes "
                                                    "share; runs pointed at one folder share answers); default: the run folder's cache/")
    seed: int | None = None
    cpus: float = Field(1.0, gt=0)
    gpus: float | None = Field(None, ge=0, description="per worker; default: what the backends need")

    @field_validator("describe_prompt")
    @classmethod
    def _describe_template(cls, v: str) -> str:
        prompts.check_template(prompts.load_prompt(v), prompts.DESCRIBE_FIELDS)
        return v

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

    @field_validator("language")
    @classmethod
    def _known_language(cls, v: str) -> str:
        Rules(language=v)
        return v

    @model_validator(mode="after")
    def _demonstrations_shown(self) -> "AnnotateSettings":
        if self.demonstrations and "demonstrations" not in prompts.load_prompt(self.instruct_prompt).fields():
            raise ValueError(f"instruct_prompt {self.instruct_prompt!r} has no {{demonstrations}} field, so the "
                             f"{self.demonstrations} demonstrations would never be shown; add it, or set demonstrations: 0")
        return self

    @field_validator("description_words", "instruction_words")
    @classmethod
    def _ordered(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= v[0] <= v[1]:
            raise ValueError(f"expected [min, max] with 0 <= min <= max, got {list(v)}")
        return v

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
    version = "2"  # 2: validation judges content (self-contradictions out; any names for the two images in)
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
        self.describer = make_generator(self.settings.describer, vision=True, workers=self.worker_count)
        self.instructor = make_generator(self.settings.instructor, vision=False, workers=self.worker_count)
        self.cache = None
        self._generated = Counter()
        if self.settings.cache:
            folder = Path(self.settings.cache_dir).expanduser() if self.settings.cache_dir else self.inputs["cache"]
            self.cache = AnswerCache(folder, read_also=[reused_cache(run) for run in self.reuse_runs])

    def process(self, unit: Unit) -> Stats:
        s = self.settings
        rows = units.read_slices(self.inputs["pairs"], unit.payload["slices"]).to_pylist()
        stats = Stats(input=len(rows))
        self._generated = stats.counters  # answers generated vs read from the cache, per step: what a variant cost
        meta = catalog.lookup(
            self.inputs["catalog"],
            {r["query_id"] for r in rows} | {r["target_id"] for r in rows},
            ["path", "offset", "size", "caption", "re_caption"],
        )
        prompt_names = {"describe_prompt": prompts.load_prompt(s.describe_prompt).name,  # a file's: name@digest
                        "instruct_prompt": prompts.load_prompt(s.instruct_prompt).name}
        for r in rows:
            r.update(status=annotations.OK, error=None, description=None, instructions=None, seed=s.seed,
                     describe_attempts=0, instruct_attempts=0, describer=self.describer.model_name,
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
        """Loads the rows' images first (a pair with an unreadable image is rejected), then describes the rest."""
        s = self.settings
        template = prompts.load_prompt(s.describe_prompt)
        bounds = Bounds(*s.description_words)
        images = self._load_images(rows, meta)
        rows = [r for r in rows if r["status"] == annotations.OK]

        def request(r: dict, attempt: int) -> ChatRequest:
            seed = request_seed(s.seed, r["pair_id"], "describe", attempt)
            r["word_num"] = prompts.draw_word_num(random.Random(seed))
            q, t = meta[r["query_id"]], meta[r["target_id"]]
            text = prompts.describe_text(template, _caption(q, s.caption_field), _caption(t, s.caption_field), r["word_num"])
            return ChatRequest(text, (images[q["id"]], images[t["id"]]), seed)

        rules = s.rules(template)

        def accept(r: dict, answer: str) -> None:
            r["description"] = check_description(answer, bounds, rules)

        self._with_retries(rows, "describe", self.describer, s.describer, request, accept)

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
            r["instructions"] = parse_instructions(answer, s.instructions_per_pair, bounds, [t["caption"], t["re_caption"]],
                                                   rules, shown[r["pair_id"]])  # fmt: skip

        self._with_retries(rows, "instruct", self.instructor, s.instructor, request, accept)

    def _with_retries(self, rows, step: str, generator, settings, request, accept) -> None:
        pending = list(rows)
        last: dict[str, str] = {}
        for attempt in range(self.settings.retries + 1):
            if not pending:
                return
            answers = self._answers(step, generator, settings, [request(r, attempt) for r in pending])
            still = []
            for r, answer in zip(pending, answers):
                r[f"{step}_attempts"] = attempt + 1
                try:
                    if isinstance(answer, Failed):
                        raise Invalid(answer.reason)
                    accept(r, answer)
                except Invalid as e:
                    last[r["pair_id"]] = e.reason
                    still.append(r)
            pending = still
        for r in pending:
            self._reject(r, f"{step}.{last[r['pair_id']]}")

    def _answers(self, step: str, generator, settings, requests: list[ChatRequest]) -> list:
        """Answers from the cache where present; the rest generated and cached (failures are not cached)."""
        if self.cache is None:
            self._generated[f"{step}.generated"] += len(requests)
            return generator.generate(requests)
        keys = [request_key(step, settings.answer_fingerprint(), r) for r in requests]
        known = self.cache.get_many(keys)
        todo = [i for i, k in enumerate(keys) if k not in known]
        self._generated[f"{step}.generated"] += len(todo)
        self._generated[f"{step}.cached"] += len(keys) - len(todo)
        fresh = generator.generate([requests[i] for i in todo]) if todo else []
        self.cache.put_many({keys[i]: a for i, a in zip(todo, fresh) if isinstance(a, str)})
        answers = [known.get(k) for k in keys]
        for i, a in zip(todo, fresh):
            answers[i] = a
        return answers

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


def reused_cache(run: Path) -> Path:
    """The answer cache folder of another run folder: its `annotate.cache_dir` if it set one, else its cache/."""
    import yaml

    try:
        cache_dir = ((yaml.safe_load((run / "config.yaml").read_text()) or {}).get("annotate") or {}).get("cache_dir")
    except FileNotFoundError:
        cache_dir = None
    return Path(cache_dir).expanduser() if cache_dir else run / "cache"


def _caption(row: dict, preferred: str) -> str:
    other = "re_caption" if preferred == "caption" else "caption"
    return row.get(preferred) or row.get(other) or ""
