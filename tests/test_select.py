"""select: a domain inside the corpus, chosen by a text query and a seed image, mined without embedding again."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from rich.console import Console

from pipeline import report, runner
from pipeline.config import ConfigError, load_config
from pipeline.rundir import STAGE_NAMES, Ledger
from stages import captions, catalog, embeddings, selection
from stages.images import open_image
from stages.models.encoders import ImageEncoder, TextEncoder
from stages.select import Query, SelectSettings, SpaceModel, query_space, shard_candidates, top_cutoff, within

TEXT = "orange circles"
TOP_N = 10
THRESHOLD = 0.55


def run_until(cfg, out: Path, last: str, reuse: tuple[Path, ...] = ()) -> None:
    """The pipeline's stages up to `last`, each in turn (annotate and write are not needed here)."""
    for name in STAGE_NAMES[: STAGE_NAMES.index(last) + 1]:
        runner.run(cfg, out, only=name, progress=False, reuse=reuse)


@pytest.fixture(scope="module")
def base_run(pipeline_config, tmp_path_factory) -> Path:
    """The test pipeline up to mine, without select queries."""
    out = tmp_path_factory.mktemp("select") / "base"
    run_until(load_config(pipeline_config), out, "mine")
    return out


def seed_image(run: Path, folder: Path) -> tuple[str, Path]:
    """A corpus image of the largest scene family, written to a file as a user's seed image would be."""
    table = catalog.read(run / "catalog", "00000", columns=["id", "meta", "path", "offset", "size"])
    rows = table.to_pylist()
    families = Counter(json.loads(r["meta"])["attributes"]["family"] for r in rows)
    family = families.most_common(1)[0][0]
    row = next(r for r in rows if json.loads(r["meta"])["attributes"]["family"] == family)
    path = folder / "seed.jpg"
    path.write_bytes(catalog.read_image_bytes(catalog.ImageRef(row["id"], row["path"], row["offset"], row["size"])))
    return row["id"], path


def brute_scores(run: Path, space: str, query: np.ndarray) -> dict[str, float]:
    """Every embedded image's score in one space, the whole space at once."""
    out = {}
    for shard in embeddings.shards(run / "embeddings", space):
        ids, vectors = embeddings.load(run / "embeddings", space, shard, ("ids", "vectors"))
        out.update(zip(ids.tolist(), (vectors.astype(np.float32) @ query).tolist()))
    return out


def selected_rows(run: Path) -> dict[str, dict[str, float]]:
    out = {}
    for shard in catalog.shards(Ledger(run).source("ingest") / "catalog"):
        for r in selection.read(run / "selection", shard).to_pylist():
            out[r["id"]] = dict(zip(r["queries"], r["scores"]))
    return out


def test_a_text_query_and_a_seed_image_choose_what_search_and_mine_use(base_run, pipeline_config, image_models, tmp_path):
    seed_id, seed = seed_image(base_run, tmp_path)
    config = tmp_path / "domain.yaml"  # the seed image named relative to the config file, as a user writes it
    config.write_text(yaml.safe_dump({"extends": str(pipeline_config), "select": {"queries": [
        {"name": "circles", "text": TEXT, "top_n": TOP_N},
        {"name": "seed", "image": "seed.jpg", "threshold": THRESHOLD, "space": "semantic"},
    ]}}))  # fmt: skip
    out = tmp_path / "domain"
    run_until(load_config(config), out, "mine", reuse=(base_run,))

    st = report.status(out)["stages"]
    assert st["embed"]["source"] == str(base_run) and not (out / "_state" / "embed" / "units").exists()  # nothing embedded again
    assert st["select"]["done"] and st["search"]["done"] and st["mine"]["done"]

    # the selection is exactly the top-N and the threshold hits over the whole space, computed here at once
    cpu = torch.device("cpu")
    text = TextEncoder(str(image_models["caption"]), cpu, torch.float32)([TEXT])[0].numpy()
    pixels = torch.from_numpy(np.asarray(open_image(seed.read_bytes())).copy()).permute(2, 0, 1)
    image = ImageEncoder(str(image_models["semantic"]), cpu, torch.float32)([pixels])[0].numpy()
    by_text, by_image = brute_scores(base_run, "caption", text), brute_scores(base_run, "semantic", image)
    want_text = set(sorted(by_text, key=lambda i: -by_text[i])[:TOP_N])
    want_image = {i for i, s in by_image.items() if s >= THRESHOLD}
    chosen = selected_rows(out)
    assert {i for i, q in chosen.items() if "circles" in q} == want_text
    assert {i for i, q in chosen.items() if "seed" in q} == want_image and set(chosen) == want_text | want_image
    assert all(abs(q["seed"] - by_image[i]) < 1e-5 for i, q in chosen.items() if "seed" in q)
    assert chosen[seed_id]["seed"] > 0.99 and 1 < len(want_image) < 40  # itself and a few like it, not the corpus
    manifest = selection.read_manifest(out / "selection")
    assert [(q["name"], q["space"], q["selected"]) for q in manifest["queries"]] == [("circles", "caption", TOP_N), ("seed", "semantic", len(want_image))]

    # the text query chose by meaning: most captions of what it chose name circles (8 of 10 measured; chance: 22 of 200)
    texts = {}
    for shard in catalog.shards(base_run / "catalog"):
        texts.update(captions.texts(base_run / "captions", shard))
    assert sum("circle" in texts[i] for i in want_text) >= 7, [texts[i] for i in want_text]

    # search and mine saw only the selection: every query, target and hard negative is a selected image
    assert st["search"]["output"] == len(chosen) == st["select"]["output"]  # mine.queries 40 > the selection: all are queries
    assert st["mine"]["input"] == st["search"]["output"] and st["mine"]["output"] > 0
    for f in (out / "neighbours").glob("*.parquet"):
        assert set(pq.read_table(f, columns=["query_id"])["query_id"].to_pylist()) <= set(chosen)
    used = set()
    for f in (out / "pairs").glob("*.parquet"):
        for p in pq.read_table(f).to_pylist():
            used |= {p["query_id"], p["target_id"], *(n["id"] for n in p["hard_negatives"])}
    assert used and used <= set(chosen)

    # megasynth status says what each query chose
    console = Console(record=True, width=200, file=io.StringIO())
    console.print(report.status_table(report.status(out)))
    assert f"select: {len(chosen)} images selected; by query: circles {TOP_N}, seed {len(want_image)}" in console.export_text()


def test_without_queries_everything_is_selected(base_run, pipeline_config, tmp_path):
    st = report.status(base_run)["stages"]
    assert selection.read_manifest(base_run / "selection") == selection.EVERYTHING
    assert st["select"]["units"]["total"] == 1 and st["select"]["output"] == st["ingest"]["output"]
    assert report.selected_line(st["select"]) is None

    # a selection of every image searches exactly as no selection does
    _, seed = seed_image(base_run, tmp_path)
    every = load_config(pipeline_config, patch={"select": {"queries": [{"name": "all", "image": str(seed), "threshold": -1.0}]}})
    out = tmp_path / "all"
    run_until(every, out, "search", reuse=(base_run,))
    assert report.status(out)["stages"]["select"]["output"] == st["embed"]["counters"]["vectors.semantic"] == st["ingest"]["output"]
    files = sorted(p.name for p in (base_run / "neighbours").glob("*.parquet"))
    assert files and files == sorted(p.name for p in (out / "neighbours").glob("*.parquet"))
    for name in files:
        assert pq.read_table(out / "neighbours" / name).equals(pq.read_table(base_run / "neighbours" / name)), name


# --- policies and settings, with literals -------------------------------------------------------


def test_top_n_across_shards_keeps_exactly_n_with_ties_broken_by_catalog_order():
    shards = {0: np.array([0.9, 0.5, 0.7, 0.7], np.float32), 1: np.array([0.7, 0.95, 0.1], np.float32)}
    candidates = {i: shard_candidates(s, 3, None) for i, s in shards.items()}
    assert candidates[0].tolist() == [0, 2, 3] and candidates[1].tolist() == [0, 1, 2]
    scores = np.concatenate([shards[i][c] for i, c in candidates.items()])
    shard_of = np.concatenate([np.full(len(c), i) for i, c in candidates.items()])
    rows = np.concatenate(list(candidates.values()))
    cut = top_cutoff(scores, shard_of, rows, 3)
    assert cut == (pytest.approx(0.7), 0, 2)  # 0.95, 0.9, then the first 0.7 in catalog order
    kept = {i: c[within(shards[i][c], i, c, cut)].tolist() for i, c in candidates.items()}
    assert kept == {0: [0, 2], 1: [1]}
    assert top_cutoff(scores, shard_of, rows, 10) is None and within(scores, 0, rows, None).all()
    assert shard_candidates(shards[1], None, 0.7).tolist() == [0, 1]


def test_a_query_is_scored_in_the_space_its_kind_and_settings_name():
    spaces = {"semantic": SpaceModel(kind="image", model="m1"), "pattern": SpaceModel(kind="image", model="m2"),
              "caption": SpaceModel(kind="text", model="m3")}  # fmt: skip
    assert query_space(Query(name="t", text="a cat", top_n=5), spaces) == "caption"
    assert query_space(Query(name="i", image="x.jpg", top_n=5), spaces) == "semantic"
    assert query_space(Query(name="i", image="x.jpg", top_n=5, space="pattern"), spaces) == "pattern"
    with pytest.raises(ValueError, match="no embed space named 'nope'"):
        query_space(Query(name="t", text="a cat", top_n=5, space="nope"), spaces)
    with pytest.raises(ValueError, match="several text spaces"):
        query_space(Query(name="t", text="a cat", top_n=5), {**spaces, "alt": SpaceModel(kind="text", model="m4")})
    with pytest.raises(ValueError, match="one of text or image"):
        Query(name="q", text="a", image="b.jpg", top_n=1)
    with pytest.raises(ValueError, match="one of top_n or threshold"):
        Query(name="q", text="a")
    with pytest.raises(ValueError, match="unique"):
        SelectSettings(queries=[Query(name="q", text="a", top_n=1), Query(name="q", text="b", top_n=1)])


def test_bad_select_settings_stop_the_run_before_anything_is_written(pipeline_config, tmp_path):
    with pytest.raises(ConfigError, match=r"select\.queries\.0.*one of top_n or threshold"):
        load_config(pipeline_config, patch={"select": {"queries": [{"name": "q", "text": "cats"}]}})
    with pytest.raises(ConfigError, match=r"select\.queries\.0\.topn: unknown key; allowed here: name, text, image, space, top_n"):
        load_config(pipeline_config, patch={"select": {"queries": [{"name": "q", "text": "cats", "topn": 3}]}})
    out = tmp_path / "run"
    bad = [({"name": "q", "text": "cats", "top_n": 3, "space": "pattern"}, "not a CLIP-style dual encoder"),  # text vs DINOv2
           ({"name": "q", "image": str(tmp_path / "missing.jpg"), "top_n": 3}, "does not exist")]  # fmt: skip
    for query, message in bad:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            runner.run(load_config(pipeline_config, patch={"select": {"queries": [query]}}), out, progress=False)
        assert not out.exists()


def tiny_clip(folder: Path, tokenizer_from: Path) -> Path:
    """A CLIP-shaped dual encoder with random weights (a real one needs the hub): both towers and their projections."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    tok = AutoTokenizer.from_pretrained(tokenizer_from)
    torch.manual_seed(0)
    text = dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=128, projection_dim=16, pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
                eos_token_id=tok.sep_token_id)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, projection_dim=16)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_a_text_query_is_scored_against_the_image_vectors_of_a_clip_space(base_run, pipeline_config, image_models, tmp_path):
    clip = tiny_clip(tmp_path / "clip", image_models["caption"])
    spaces = json.dumps({"joint": {"kind": "image", "model": str(clip)}})
    query = {"name": "cats", "text": "a photo of a cat", "space": "joint", "top_n": 5}
    cfg = load_config(pipeline_config, [f"embed.spaces={spaces}"], patch={"select": {"queries": [query]}})
    out = tmp_path / "joint"
    run_until(cfg, out, "select", reuse=(base_run,))

    vector = TextEncoder(str(clip), torch.device("cpu"), torch.float32)([query["text"]])[0].numpy()  # the text tower, projected
    scores = brute_scores(out, "joint", vector)
    assert len(vector) == 16 and len(scores) == report.status(out)["stages"]["ingest"]["output"]
    assert set(selected_rows(out)) == set(sorted(scores, key=lambda i: -scores[i])[:5])
    assert selection.read_manifest(out / "selection")["queries"][0] | {"cutoff": None} == {
        "name": "cats", "kind": "text", "query": query["text"], "space": "joint", "top_n": 5, "threshold": None, "cutoff": None, "selected": 5}


def test_plan_lists_select_and_sizes_mining_by_its_top_n():
    from pipeline.plan import query_count, unit_plan

    megapairs = Path(__file__).resolve().parent.parent / "configs" / "megapairs.yaml"
    queries = [{"name": "shoes", "text": "a pair of shoes", "top_n": 300_000}, {"name": "bags", "text": "a handbag", "top_n": 200_000}]
    plain, domain = load_config(megapairs), load_config(megapairs, patch={"select": {"queries": queries}})
    stages = {s.stage: s for s in unit_plan(plain, 20_000_000)}
    assert [(w.units, w.sized) for w in stages["select"].waves] == [(1, False)]  # nothing to score
    stages = {s.stage: s for s in unit_plan(domain, 20_000_000)}
    assert [(w.units, w.sized) for w in stages["select"].waves] == [(1, False), (2_000, True), (1, False), (2_000, True)]
    assert query_count(domain, 20_000_000) <= 500_000 < query_count(plain, 20_000_000)  # at most the top-N's sum is mined
