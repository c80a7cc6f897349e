"""select: a domain inside a large corpus, chosen by text queries and seed images scored against its embeddings.

Each query is a text or an image scored in one embedding space: a text against a text space's caption
vectors, an image against an image space's vectors, or across (a text against an image space, an image
against a text space) when the space's model is a CLIP-style dual encoder, whose two towers share one
projection. The query is encoded by the space's own model, as embed loads it, on the CPU (a handful of
queries); the corpus is never embedded again. A query keeps its `top_n` best images, or every image
scoring at least `threshold` (cosine similarity). Search and mine then use only the selected images, as
queries, targets and hard negatives.

Waves: `encode` (the query vectors); `score-{shard}` per catalog shard (threshold hits, or the shard's own
top-N with its ties, which holds every image of the global top-N); `merge` (each top-N's global cutoff,
and `selection.json`); `select-{shard}` (the shard's selected ids, `stages.selection`). A worker holds one
shard's scores; the merge holds the top-N candidates only (at most top_n, plus ties, per shard and query).
No queries: one `everything` unit writes a manifest saying so, and search and mine run as without select.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from stages import catalog, embeddings, selection
from stages.base import Resources, Stage, StageSettings, Stats, Unit, atomic_path
from stages.images import ImageRejected, open_image
from stages.models.encoders import Pooling, looks_local

CONFIG_RELATIVE = {"relative_to_config": True}
NAME = re.compile(r"[A-Za-z0-9_-]+")
#: Dual encoders whose towers embed loads with their shared projection (encoders._load_tower): a text and an
#: image land in one space, so either can be scored against the other's vectors.
JOINT_MODEL_TYPES = ("clip", "chinese_clip")
SCRATCH = ".scores"  # under the output: query vectors and per-shard candidates, removed when the stage is done


class Query(StageSettings):
    name: str = Field(description="names the query in `megasynth status` (selected.<name>) and in selection/: letters, digits, - and _")
    text: str | None = Field(None, description="a text query, e.g. 'red circles'")
    image: str | None = Field(None, json_schema_extra=CONFIG_RELATIVE, description="a seed image file, relative to the config file that names it")
    space: str | None = Field(None, description=(
        "the embed space it is scored in; default: a text in the config's text space (against the captions), an image in "
        "the first image space; across kinds only in a CLIP-style space (one model for both towers)"))
    top_n: int | None = Field(None, gt=0, description="keep the n best-scoring images (ties broken by catalog order)")
    threshold: float | None = Field(None, ge=-1, le=1, description="keep every image whose cosine similarity to the query is at least this")

    @model_validator(mode="after")
    def _one_of_each(self) -> "Query":
        if not NAME.fullmatch(self.name):
            raise ValueError(f"name {self.name!r}: use letters, digits, - and _")
        if (self.text is None) == (self.image is None):
            raise ValueError(f"query {self.name!r}: give one of text or image")
        if self.text is not None and not self.text.strip():
            raise ValueError(f"query {self.name!r}: the text is empty")
        if (self.top_n is None) == (self.threshold is None):
            raise ValueError(f"query {self.name!r}: give one of top_n or threshold")
        return self

    @property
    def kind(self) -> Literal["text", "image"]:
        return "text" if self.text is not None else "image"


class SpaceModel(BaseModel):
    """An embed space as select needs it: which model made its vectors (the config copies `embed.spaces`)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    kind: Literal["image", "text"]
    model: str
    pooling: Pooling = "auto"
    max_length: int = 128


class SelectSettings(StageSettings):
    queries: list[Query] = Field(default_factory=list, description=(
        "texts and seed images that choose the images to mine; an image is selected when any query selects it. "
        "None: every image is mined"))
    spaces: dict[str, SpaceModel] = Field(default_factory=dict, description="the embed spaces (from `embed.spaces`, not written here)")
    cpus: float = Field(1.0, gt=0)

    @field_validator("queries")
    @classmethod
    def _unique(cls, v: list[Query]) -> list[Query]:
        names = [q.name for q in v]
        if dup := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"query names must be unique: {', '.join(dup)}")
        return v


# --- policies: plain functions of data ------------------------------------------------------------


def query_space(q: Query, spaces: dict[str, SpaceModel]) -> str:
    """The space a query is scored in: its own `space`, else the one text space (texts) or the first image space (images)."""
    if q.space is not None:
        if q.space not in spaces:
            raise ValueError(f"select.queries {q.name!r}: no embed space named {q.space!r} (spaces: {', '.join(spaces)})")
        return q.space
    of_kind = [n for n, sp in spaces.items() if sp.kind == q.kind]
    if not of_kind:
        raise ValueError(f"select.queries {q.name!r}: embed.spaces has no {q.kind} space; name a CLIP-style space with `space:`")
    if q.kind == "text" and len(of_kind) > 1:
        raise ValueError(f"select.queries {q.name!r}: several text spaces ({', '.join(of_kind)}); name one with `space:`")
    return of_kind[0]


def is_joint(model_type: str | None, pooling: str) -> bool:
    """Whether a space's vectors share one space with the other tower's: a CLIP-style model, projected."""
    return model_type in JOINT_MODEL_TYPES and pooling in ("auto", "projection")


def shard_candidates(scores: np.ndarray, top_n: int | None, threshold: float | None) -> np.ndarray:
    """Rows of one shard a query may select: its threshold hits, or its top_n with every tie at the edge."""
    if threshold is not None:
        return np.flatnonzero(scores >= np.float32(threshold))
    if len(scores) <= top_n:
        return np.arange(len(scores))
    kth = np.partition(scores, len(scores) - top_n)[len(scores) - top_n]
    return np.flatnonzero(scores >= kth)  # ties kept: the global cutoff decides between them by catalog order


def top_cutoff(scores: np.ndarray, shards: np.ndarray, rows: np.ndarray, n: int) -> tuple[float, int, int] | None:
    """The last of the `n` best candidates, by score then (shard, row): (score, shard, row); None when there are at most n."""
    if len(scores) <= n:
        return None
    kth = np.partition(scores, len(scores) - n)[len(scores) - n]  # the n-th highest score
    above = int((scores > kth).sum())
    tied = np.flatnonzero(scores == kth)
    last = tied[np.lexsort((rows[tied], shards[tied]))[n - above - 1]]
    return float(kth), int(shards[last]), int(rows[last])


def within(scores: np.ndarray, shard: int, rows: np.ndarray, cutoff: tuple[float, int, int] | None) -> np.ndarray:
    """Which candidates of one shard rank at or before the cutoff."""
    if cutoff is None:
        return np.ones(len(scores), bool)
    score, at_shard, at_row = cutoff
    s = np.float32(score)
    return (scores > s) | ((scores == s) & ((shard < at_shard) | ((shard == at_shard) & (rows <= at_row))))


# --- the stage -----------------------------------------------------------------------------------


class SelectStage(Stage):
    name = "select"
    Settings = SelectSettings
    settings: SelectSettings
    version = "1"

    def resources(self) -> Resources:
        return Resources(cpus=self.settings.cpus)

    def selects_everything(self) -> bool:
        return not self.settings.queries

    def space_of(self, q: Query) -> str:
        return query_space(q, self.settings.spaces)

    def reuse_key(self) -> dict:
        s = self.settings
        if not s.queries:
            return {"queries": []}
        # a seed image by its bytes, not its path: a moved config folder selects the same images
        queries = [q.model_dump(mode="json") | ({"image": self._seed_digest(q)} if q.image else {}) for q in s.queries]
        used = sorted({self.space_of(q) for q in s.queries})
        return {"queries": queries, "spaces": {n: s.spaces[n].model_dump(mode="json") for n in used}}

    def check(self) -> None:
        s = self.settings
        if s.queries and not s.spaces:
            raise ValueError("select: no embed spaces given to score the queries in")
        for q in s.queries:
            sp = s.spaces[self.space_of(q)]
            if q.image is not None:
                self._seed_image(q)
            if q.kind != sp.kind and looks_local(sp.model):  # a hub id is checked when the query is encoded
                self._check_joint(q, sp)

    def _seed_digest(self, q: Query) -> str:
        try:
            return hashlib.sha256(Path(q.image).read_bytes()).hexdigest()[:16]
        except FileNotFoundError:
            raise FileNotFoundError(f"select.queries {q.name!r}: image {q.image} does not exist") from None

    def _seed_image(self, q: Query):
        try:
            return open_image(Path(q.image).read_bytes())
        except FileNotFoundError:
            raise FileNotFoundError(f"select.queries {q.name!r}: image {q.image} does not exist") from None
        except ImageRejected as e:
            raise ValueError(f"select.queries {q.name!r}: image {q.image} cannot be used: {e}") from None

    def _check_joint(self, q: Query, sp: SpaceModel) -> None:
        from transformers import AutoConfig

        model_type = getattr(AutoConfig.from_pretrained(sp.model), "model_type", None)
        if not is_joint(model_type, sp.pooling):
            raise ValueError(f"select.queries {q.name!r}: a {q.kind} query cannot be scored in {sp.kind} space {self.space_of(q)!r}: "
                             f"its model ({model_type}, pooling {sp.pooling}) is not a CLIP-style dual encoder "
                             f"({', '.join(JOINT_MODEL_TYPES)}) with projection pooling")  # fmt: skip

    # --- planning ------------------------------------------------------------------------------

    def plan(self) -> list[list[Unit]]:
        if self.selects_everything():
            return [[Unit("everything")]]
        embedded = embeddings.spaces(self.inputs["embeddings"])
        for q in self.settings.queries:
            if (space := self.space_of(q)) not in embedded:
                raise ValueError(f"select.queries {q.name!r}: space {space!r} was not embedded (embedded: {', '.join(embedded)})")
        shards = catalog.shards(self.inputs["catalog"])
        return [
            [Unit("encode", items=len(self.settings.queries))],
            [Unit(f"score-{s}", {"shard": s}) for s in shards],
            [Unit("merge")],
            [Unit(f"select-{s}", {"shard": s, "index": i}) for i, s in enumerate(shards)],
        ]

    # --- units ---------------------------------------------------------------------------------

    def process(self, unit: Unit) -> Stats:
        if unit.id == "everything":
            selection.write_manifest(self.output, selection.EVERYTHING)
            n = selection.images(self.inputs["catalog"], None)
            return Stats(input=n, output=n)
        if unit.id == "encode":
            return self._encode()
        if unit.id == "merge":
            return self._merge()
        if unit.id.startswith("score-"):
            return self._score(unit.payload["shard"])
        return self._select(unit.payload["shard"], unit.payload["index"])

    @property
    def scratch(self) -> Path:
        return self.output / SCRATCH

    def _encode(self) -> Stats:
        """Every query's vector, by its space's own model on the CPU (float32)."""
        import torch

        from stages.models.encoders import ImageEncoder, TextEncoder

        torch.set_num_threads(max(1, int(self.settings.cpus)))
        cpu, loaded = torch.device("cpu"), {}
        vectors = {}
        for j, q in enumerate(self.settings.queries):
            space = self.space_of(q)
            sp = self.settings.spaces[space]
            if q.kind != sp.kind:
                self._check_joint(q, sp)
            # the other tower of a joint model: its projection (pooling auto), its tokenizer's own length limit
            pooling, max_length = (sp.pooling, sp.max_length) if q.kind == sp.kind else ("auto", 128)
            key = (q.kind, sp.model, pooling, max_length)
            if key not in loaded:
                loaded[key] = (TextEncoder(sp.model, cpu, torch.float32, pooling, max_length) if q.kind == "text"
                               else ImageEncoder(sp.model, cpu, torch.float32, pooling))  # fmt: skip
            enc = loaded[key]
            if q.kind == "text":
                v = enc([q.text])
            else:
                pixels = torch.from_numpy(np.asarray(self._seed_image(q)).copy()).permute(2, 0, 1)  # as embed decodes
                v = enc([pixels])
            vectors[f"q{j}"] = v[0].numpy().astype(np.float32)
            dim = (embeddings.read_manifest(self.inputs["embeddings"], space) or {}).get("dim")
            if dim is not None and dim != len(vectors[f"q{j}"]):
                raise ValueError(f"select.queries {q.name!r}: its vector has {len(vectors[f'q{j}'])} dims, space {space!r} has {dim}")
            self.advance(1)
        with atomic_path(self.scratch / "queries.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **vectors)
        return Stats()

    def _score(self, shard: str) -> Stats:
        """One shard's candidates for every query: threshold hits, or the shard's top-N (ties kept)."""
        s, emb = self.settings, self.inputs["embeddings"]
        with np.load(self.scratch / "queries.npz") as z:
            vectors = {j: z[f"q{j}"] for j in range(len(s.queries))}
        by_space: dict[str, list[int]] = {}
        for j, q in enumerate(s.queries):
            by_space.setdefault(self.space_of(q), []).append(j)
        out, stats = {}, Stats(input=catalog.ok_count(self.inputs["catalog"], shard))
        for space, js in sorted(by_space.items()):
            if embeddings.space_file(emb, space, shard).exists():
                ids, base = embeddings.load(emb, space, shard, ("ids", "vectors"))
            else:  # nothing of this shard in the space
                ids, base = np.zeros(0, str), np.zeros((0, len(vectors[js[0]])), np.float16)
            stats.counters[f"scored.{space}"] += len(ids)
            scores = base.astype(np.float32) @ np.stack([vectors[j] for j in js], axis=1) if len(ids) else np.zeros((0, len(js)), np.float32)
            for col, j in enumerate(js):
                q = s.queries[j]
                keep = shard_candidates(scores[:, col], q.top_n, q.threshold)
                out.update({f"q{j}.rows": keep.astype(np.int32), f"q{j}.scores": scores[keep, col], f"q{j}.ids": ids[keep].astype(str)})
        with atomic_path(self.scratch / f"{shard}.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **out)
        return stats

    def _merge(self) -> Stats:
        """Each top-N query's global cutoff from every shard's candidates, and the manifest with every query's count."""
        s = self.settings
        shards = catalog.shards(self.inputs["catalog"])
        counts = [0] * len(s.queries)
        tops = {j: ([], [], []) for j, q in enumerate(s.queries) if q.top_n is not None}
        for i, shard in enumerate(shards):
            with np.load(self.scratch / f"{shard}.npz") as z:
                for j in range(len(s.queries)):
                    scores = z[f"q{j}.scores"]
                    counts[j] += len(scores)
                    if j in tops:
                        for part, a in zip(tops[j], (scores, np.full(len(scores), i, np.int32), z[f"q{j}.rows"])):
                            part.append(a)
        queries = []
        for j, q in enumerate(s.queries):
            cutoff = None
            if j in tops:
                scores, shard_of, rows = (np.concatenate(p) if p else np.zeros(0) for p in tops[j])
                cutoff = top_cutoff(scores, shard_of, rows, q.top_n)
                counts[j] = min(counts[j], q.top_n)
            queries.append({"name": q.name, "kind": q.kind, "query": q.text if q.text is not None else Path(q.image).name,
                            "space": self.space_of(q), "top_n": q.top_n, "threshold": q.threshold, "cutoff": cutoff,
                            "selected": counts[j]})  # fmt: skip
        selection.write_manifest(self.output, {"everything": False, "queries": queries})
        return Stats()

    def _select(self, shard: str, index: int) -> Stats:
        """One shard's selected ids in catalog order, with the queries that chose each and their scores."""
        s = self.settings
        cutoffs = {q["name"]: q["cutoff"] for q in selection.read_manifest(self.output)["queries"]}
        chosen: dict[str, tuple[list, list]] = {}
        stats = Stats()
        with np.load(self.scratch / f"{shard}.npz") as z:
            for j, q in enumerate(s.queries):
                scores, rows, ids = z[f"q{j}.scores"], z[f"q{j}.rows"], z[f"q{j}.ids"]
                keep = np.flatnonzero(within(scores, index, rows, cutoffs[q.name]))
                stats.counters[f"selected.{q.name}"] += len(keep)
                for i in keep:
                    names, values = chosen.setdefault(str(ids[i]), ([], []))
                    names.append(q.name)
                    values.append(float(scores[i]))
        catalog_ids = catalog.read(self.inputs["catalog"], shard, ok_only=False, columns=["id"])["id"].to_pylist()
        position = {i: n for n, i in enumerate(catalog_ids)}
        order = sorted(chosen, key=position.__getitem__)
        stats.output = len(order)
        with atomic_path(selection.shard_file(self.output, shard)) as tmp:
            selection.write(tmp, {"id": order, "queries": [chosen[i][0] for i in order], "scores": [chosen[i][1] for i in order]})
        return stats

    def finish(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)
