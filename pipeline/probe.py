"""`megasynth probe RUN`: a fast proxy of what a run's triplets teach a retrieval model.

A small fusion head learns, on embeddings the run already has, to map (query image, instruction)
to the target image: the instruction goes through the run's caption-space text encoder, the images
are their vectors in the run's image spaces (concatenated), and the loss is InfoNCE over the
other targets of the batch and the triplet's `hns` (the query image, then its mined hard
negatives, as the released triplets list them). Recall@1/5/10 is measured against every image of
the corpus (the query itself and its exact copies left out) on triplets whose query was held out,
and, when the catalog carries the synthetic corpus's attributes, on a ground-truth set built from
it: (an image, the change the generator made, its sibling). That set depends on the corpus only,
so it compares the variants of a sweep; the held-out triplets are each run's own.

Each number comes with `query_only`, the same retrieval with the query image alone: what the
instructions add is the difference. Results go to RUN/probe.json.
"""

from __future__ import annotations

import copy
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from pipeline import quality
from pipeline.rundir import Ledger, write_json
from stages import annotations, embeddings
from stages.models.encoders import TextEncoder, resolve_device

RESULT_FILE = "probe.json"
KS = (1, 5, 10)


class ProbeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    image_spaces: list[str] | None = Field(None, description="image spaces whose vectors (concatenated) stand for an image; default: every image space of the run")
    text_space: str | None = Field(None, description="the text space whose model embeds instructions; default: the run's only text space")
    held_out: float = Field(0.2, gt=0, lt=1, description="share of query images (by a hash of their id) whose triplets are only evaluated")
    steps: int = Field(400, gt=0, description="training steps at most")
    validation: float = Field(0.1, ge=0, lt=1, description="share of the training queries whose triplets choose the step kept: the best recall there, step 0 (the query alone) included")
    check_every: int = Field(20, gt=0, description="steps between two checks on the validation triplets")
    batch_size: int = Field(64, gt=1)
    hidden: int = Field(512, gt=0, description="width of the fusion head's hidden layer")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    temperature: float = Field(0.05, gt=0, description="InfoNCE temperature")
    ground_truth: int = Field(1000, ge=0, description="most (image, change, sibling) triplets in the ground-truth set; 0: none")
    seed: int = 0
    device: str = Field("cpu", description="cpu, cuda or auto")


class FusionHead(nn.Module):
    """query + MLP([query; instruction]), normalised: it starts as the query alone and learns what the text adds."""

    def __init__(self, image_dim: int, text_dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(image_dim + text_dim, hidden), nn.GELU(), nn.Linear(hidden, image_dim))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, query: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return F.normalize(query + self.mlp(torch.cat([query, text], dim=-1)), dim=-1)


@dataclass
class Gallery:
    """Every embedded image of the run: id, exact-copy hash and vector, in one order."""

    ids: list[str]
    hashes: np.ndarray
    vectors: torch.Tensor
    index: dict[str, int]


@dataclass
class Triplets:
    """Evaluation or training triplets as gallery rows: query, target, one text each (or several to draw from)."""

    query: np.ndarray
    target: np.ndarray
    texts: list[list[str]]
    negatives: list[list[int]]

    def subset(self, mask: np.ndarray) -> "Triplets":
        at = np.nonzero(mask)[0]
        return Triplets(self.query[at], self.target[at], [self.texts[i] for i in at], [self.negatives[i] for i in at])


def held_out(query_id: str, share: float) -> bool:
    """A stable split by query: every triplet of one query image falls on the same side."""
    return int(hashlib.sha1(query_id.encode()).hexdigest()[:8], 16) < share * 2**32


def load_gallery(run_dir: Path, spaces: list[str]) -> Gallery:
    folder = Ledger(run_dir).source("embed") / "embeddings"
    per_space = []
    for space in spaces:
        ids, hashes, vecs = [], [], []
        for shard in embeddings.shards(folder, space):
            i, h, v = embeddings.load(folder, space, shard)
            ids += i.tolist()
            hashes.append(h)
            vecs.append(v.astype(np.float32))
        per_space.append((ids, np.concatenate(hashes), np.concatenate(vecs)))
    common = set(per_space[0][0]).intersection(*(set(p[0]) for p in per_space[1:]))
    ids = [i for i in per_space[0][0] if i in common]  # an image must have a vector in every space
    parts, hashes = [], None
    for space_ids, space_hashes, vecs in per_space:
        at = {i: n for n, i in enumerate(space_ids)}
        rows = np.array([at[i] for i in ids], dtype=np.int64)
        parts.append(vecs[rows] / np.float32(np.sqrt(len(spaces))))  # unit vectors stay unit vectors once concatenated
        hashes = space_hashes[rows] if hashes is None else hashes
    vectors = torch.from_numpy(np.concatenate(parts, axis=1))
    return Gallery(ids, hashes, vectors, {i: n for n, i in enumerate(ids)})


def choose_spaces(run_dir: Path, settings: ProbeSettings) -> tuple[list[str], str, dict]:
    """The image spaces, the text space and its manifest (model, pooling), checked against the run."""
    folder = Ledger(run_dir).source("embed") / "embeddings"
    manifests = embeddings.read_manifests(folder)
    if not manifests:
        raise ValueError(f"{run_dir}: no embeddings; run the pipeline (at least through embed) first")
    image = sorted(s for s, m in manifests.items() if m.get("kind") == "image")
    text = sorted(s for s, m in manifests.items() if m.get("kind") == "text")
    spaces = settings.image_spaces or image
    if not spaces or any(s not in image for s in spaces):
        raise ValueError(f"image spaces {settings.image_spaces or []} not in the run's image spaces {image}")
    if settings.text_space is not None and settings.text_space not in text:
        raise ValueError(f"text space {settings.text_space!r} not in the run's text spaces {text}")
    if settings.text_space is None and len(text) != 1:
        raise ValueError(f"the probe embeds instructions with a text space; the run has {text or 'none'}: name one with --text-space")
    name = settings.text_space or text[0]
    manifest = dict(manifests[name])
    embed_rec = Ledger(run_dir).stage_record("embed") or {}
    space_settings = ((embed_rec.get("settings") or {}).get("spaces") or {}).get(name) or {}
    manifest["max_length"] = int(space_settings.get("max_length", 128))
    return spaces, name, manifest


def embed_texts(manifest: dict, texts: list[str], device: torch.device, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Each distinct text's vector in the text space, by the same model embed used for captions."""
    unique = sorted(set(texts))
    if not unique:
        return {}
    enc = TextEncoder(manifest["model"], device, torch.float32, manifest.get("pooling", "auto"), manifest["max_length"])
    order = np.argsort(enc.lengths(unique), kind="stable")  # similar lengths share a batch: less padding
    out: dict[str, torch.Tensor] = {}
    for start in range(0, len(order), batch_size):
        batch = [unique[i] for i in order[start : start + batch_size]]
        for text, vec in zip(batch, enc(batch).cpu()):
            out[text] = vec
    return out


def read_triplets(run_dir: Path, gallery: Gallery, share: float) -> tuple[Triplets, Triplets, dict]:
    """The run's annotated pairs as (train, held-out) triplets; pairs whose images have no vector are counted."""
    folder = Ledger(run_dir).source("annotate") / "annotations"
    units = annotations.units(folder) if folder.is_dir() else []
    if not units:
        raise ValueError(f"{run_dir}: no annotations; run the pipeline through annotate first")
    sides = {True: ([], [], [], []), False: ([], [], [], [])}
    counts = {"pairs": 0, "without_vectors": 0, "without_instructions": 0}
    for unit in units:
        for row in annotations.read(folder, unit):
            counts["pairs"] += 1
            q, t = gallery.index.get(row["query_id"]), gallery.index.get(row["target_id"])
            if q is None or t is None:
                counts["without_vectors"] += 1
                continue
            texts = [s for s in row["instructions"] or [] if s and s.strip()]
            if not texts:
                counts["without_instructions"] += 1
                continue
            side = sides[held_out(row["query_id"], share)]
            side[0].append(q)
            side[1].append(t)
            side[2].append(texts)
            negatives = [gallery.index[h["id"]] for h in row["hard_negatives"] if h["id"] in gallery.index]
            side[3].append([q, *negatives])  # hns as released: the query image first
    train, test = (Triplets(np.array(s[0], dtype=np.int64), np.array(s[1], dtype=np.int64), s[2], s[3]) for s in (sides[False], sides[True]))
    return train, test, counts


def ground_truth(run_dir: Path, gallery: Gallery, limit: int) -> tuple[Triplets, np.ndarray] | None:
    """(image, the generator's change in words, sibling) for scenes of one family that differ as a variant does,
    and each gallery image's scene (family, variant); None when the catalog has no attributes."""
    if limit == 0:
        return None
    attrs = quality.run_attributes(run_dir, set(gallery.ids))
    if attrs is None:
        return None
    scene = np.array([f"{a['family']}/{a['variant']}" if (a := attrs.get(i)) else f"?{i}" for i in gallery.ids], dtype=object)
    families: dict[str, list[str]] = {}
    for i in gallery.ids:
        a = attrs.get(i)
        if a is not None and a.get("copy") is None:  # originals only: a copy is the same scene again
            families.setdefault(a["family"], []).append(i)
    candidates = []
    for members in families.values():
        for q in members:
            for t in members:
                if attrs[q]["variant"] == attrs[t]["variant"]:
                    continue
                found = quality.changes(attrs[q], attrs[t])
                if 1 <= len(found) <= quality.MAX_SHARED_CHANGES and all(c.axis in quality.VARIATIONS for c in found):
                    key = hashlib.sha1(f"{q}\t{t}".encode()).hexdigest()
                    candidates.append((key, q, t, quality.change_text(attrs[q], attrs[t])))
    chosen = sorted(candidates)[:limit]  # a seeded-free, stable choice: the same set for every run of a corpus
    if not chosen:
        return None
    idx = gallery.index
    triplets = Triplets(
        np.array([idx[q] for _, q, _, _ in chosen], dtype=np.int64),
        np.array([idx[t] for _, _, t, _ in chosen], dtype=np.int64),
        [[text] for *_, text in chosen],
        [[] for _ in chosen],
    )
    return triplets, scene


def train_head(train: Triplets, validation: Triplets, gallery: Gallery, text_vecs: dict[str, torch.Tensor],
               s: ProbeSettings) -> tuple[FusionHead, dict]:  # fmt: skip
    """The head after the step that did best on the validation triplets (step 0: the query alone), and how training went."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a head this small runs fastest on one thread; more only contend
    try:
        return _train(train, validation, gallery, text_vecs, s)
    finally:
        torch.set_num_threads(threads)


def _train(train: Triplets, validation: Triplets, gallery: Gallery, text_vecs: dict[str, torch.Tensor], s: ProbeSettings) -> tuple[FusionHead, dict]:
    torch.manual_seed(s.seed)
    gen = torch.Generator().manual_seed(s.seed)
    text_dim = next(iter(text_vecs.values())).shape[0]
    head = FusionHead(gallery.vectors.shape[1], text_dim, s.hidden)
    opt = torch.optim.AdamW(head.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    n = len(train.query)
    width = max(len(h) for h in train.negatives)
    negatives = torch.full((n, width), -1, dtype=torch.long)
    for i, h in enumerate(train.negatives):
        negatives[i, : len(h)] = torch.tensor(h, dtype=torch.long)
    query, target = torch.from_numpy(train.query), torch.from_numpy(train.target)
    val_correct = gallery.hashes[None, :] == gallery.hashes[validation.target][:, None]

    def score() -> float:
        if len(validation.query) == 0:
            return 0.0  # nothing to choose by: the last step is kept
        r = evaluate(head.eval(), validation, val_correct, gallery, text_vecs, query_only=False)
        head.train()
        return sum(r[f"recall@{k}"] for k in KS)

    best = (score(), 0, copy.deepcopy(head.state_dict()))
    order, at, losses = torch.randperm(n, generator=gen), 0, []
    for step in range(1, s.steps + 1):
        if at + min(s.batch_size, n) > n:
            order, at = torch.randperm(n, generator=gen), 0
        rows = order[at : at + s.batch_size]
        at += len(rows)
        # one instruction per triplet and step, drawn from its list (MegaPairs' q_text)
        draws = torch.randint(0, 1 << 30, (len(rows),), generator=gen).tolist()
        text = torch.stack([text_vecs[train.texts[r][d % len(train.texts[r])]] for r, d in zip(rows.tolist(), draws)])
        pred = head(gallery.vectors[query[rows]], text)
        t = target[rows]
        in_batch = pred @ gallery.vectors[t].T
        in_batch = in_batch.masked_fill((t[None, :] == t[:, None]) & ~torch.eye(len(rows), dtype=torch.bool), float("-inf"))
        neg = negatives[rows]
        hard = torch.einsum("bd,bhd->bh", pred, gallery.vectors[neg.clamp(min=0)])
        hard = hard.masked_fill((neg < 0) | (neg == t[:, None]), float("-inf"))
        logits = torch.cat([in_batch, hard], dim=1) / s.temperature
        loss = F.cross_entropy(logits, torch.arange(len(rows)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step % s.check_every == 0 or step == s.steps:
            value = score()
            if value > best[0] or (len(validation.query) == 0 and step == s.steps):
                best = (value, step, copy.deepcopy(head.state_dict()))
    head.load_state_dict(best[2])
    info = {"steps": s.steps, "kept_step": best[1], "validation_triplets": len(validation.query),
            "first_loss": round(losses[0], 4), "last_loss": round(float(np.mean(losses[-20:])), 4)}  # fmt: skip
    return head.eval(), info


@torch.no_grad()
def recall(pred: torch.Tensor, queries: np.ndarray, correct: np.ndarray, gallery: Gallery) -> dict[str, float]:
    """Recall@k against the whole gallery; `correct` is a (queries x gallery) mask of right answers. The query
    image and its exact copies are not candidates."""
    hits = np.zeros(len(KS))
    for start in range(0, len(pred), 1024):
        scores = (pred[start : start + 1024] @ gallery.vectors.T).numpy()
        q = queries[start : start + 1024]
        excluded = gallery.hashes[None, :] == gallery.hashes[q][:, None]
        excluded[np.arange(len(q)), q] = True
        ok = correct[start : start + 1024] & ~excluded
        best = np.where(ok, scores, -np.inf).max(axis=1)
        better = ((scores > best[:, None]) & ~ok & ~excluded).sum(axis=1)
        hits += np.array([(better < k).sum() for k in KS])
    n = max(len(pred), 1)
    return {f"recall@{k}": round(float(h / n), 4) for k, h in zip(KS, hits)}


def evaluate(head: FusionHead, triplets: Triplets, correct: np.ndarray, gallery: Gallery, text_vecs: dict[str, torch.Tensor],
             query_only: bool = True) -> dict:  # fmt: skip
    """Every (triplet, instruction) once; and the same with the query image alone, for reference."""
    rows = [(i, text) for i, texts in enumerate(triplets.texts) for text in texts]
    at = np.array([i for i, _ in rows], dtype=np.int64)
    queries = triplets.query[at]
    with torch.no_grad():
        pred = head(gallery.vectors[queries], torch.stack([text_vecs[t] for _, t in rows]))
    out = {"triplets": len(triplets.query), "instructions": len(rows), **recall(pred, queries, correct[at], gallery)}
    if query_only:
        out["query_only"] = recall(gallery.vectors[queries], queries, correct[at], gallery)
    return out


def probe(run_dir: str | Path, settings: ProbeSettings = ProbeSettings()) -> dict:
    """Train the head on the run's triplets, measure recall, write RUN/probe.json and return what it holds."""
    run_dir = Path(run_dir)
    if not (run_dir / "_state").is_dir():
        raise ValueError(f"{run_dir} is not a megasynth run folder (no _state/)")
    annotate = Ledger(run_dir).summary_chain()["annotate"]
    if not annotate["done"]:  # a part of the triplets would give numbers that mean nothing
        units = annotate["units"]
        raise ValueError(f"{run_dir}: annotate is not done ({units['done']} of {units['total']} units"
                         f"{', stale' if annotate['stale'] else ''}); finish the run first")  # fmt: skip
    started = time.perf_counter()
    spaces, text_space, manifest = choose_spaces(run_dir, settings)
    gallery = load_gallery(run_dir, spaces)
    train, test, counts = read_triplets(run_dir, gallery, settings.held_out)
    if len(train.query) == 0 or len(test.query) == 0:
        raise ValueError(f"{run_dir}: {len(train.query)} training and {len(test.query)} held-out triplets; the probe needs some of both")
    truth = ground_truth(run_dir, gallery, settings.ground_truth)
    texts = [t for ts in train.texts + test.texts + (truth[0].texts if truth else []) for t in ts]
    t0 = time.perf_counter()
    text_vecs = embed_texts(manifest, texts, resolve_device(settings.device))
    encode_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    in_validation = np.array([held_out("validation\t" + gallery.ids[q], settings.validation) for q in train.query], dtype=bool)
    if in_validation.all():  # too few queries to set any aside: train on all, keep the last step
        in_validation[:] = False
    head, info = train_head(train.subset(~in_validation), train.subset(in_validation), gallery, text_vecs, settings)
    train_s = time.perf_counter() - t0

    same_image = gallery.hashes[None, :] == gallery.hashes[test.target][:, None]  # the target or an exact copy of it
    result = {
        "run": str(run_dir.resolve()),
        "settings": settings.model_dump(),
        "image_spaces": spaces,
        "text_space": text_space,
        "text_model": manifest["model"],
        "gallery": len(gallery.ids),
        "pairs": counts,
        "train": {"triplets": len(train.query), "instructions": sum(map(len, train.texts)), **info},
        "held_out": evaluate(head, test, same_image, gallery, text_vecs),
        "ground_truth": None,
    }
    if truth is not None:
        gt, scene = truth
        same_scene = scene[None, :] == scene[gt.target][:, None]  # the sibling or a copy of it
        result["ground_truth"] = evaluate(head, gt, same_scene, gallery, text_vecs)
    result["seconds"] = {"encode_texts": round(encode_s, 1), "train": round(train_s, 1), "total": round(time.perf_counter() - started, 1)}
    write_json(run_dir / RESULT_FILE, result)
    return result
