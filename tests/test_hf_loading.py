"""The written dataset as the Hugging Face stack reads it: `datasets` loads the triplet shards as they are, through
the card or as plain WebDataset, with every field of every sample; the card states licences and toy models."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pyarrow as pa
import webdataset as wds
import yaml
from PIL import Image

from pipeline.report import card_metadata, is_toy_model, model_license, triplet_count
from stages.write import PROVENANCE, WriteSettings
from test_write import annotated, annotation, run_write, write_annotations

# Set before `datasets` is first imported (it reads them once): nothing here may reach the Hub.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"


def raw_samples(triplets: Path) -> dict[str, dict]:
    """Every triplet sample as its tar holds it, by key."""
    shards = sorted(str(p) for p in triplets.glob("triplets-*.tar"))
    return {s["__key__"]: s for s in wds.WebDataset(shards, shardshuffle=False)}


def assert_loaded_as_written(ds, raw: dict[str, dict]) -> None:
    """Every row is one written sample, field for field (images as their JPEG bytes), and every sample is a row."""
    from datasets import Image as HFImage

    ds = ds.cast_column("query.jpg", HFImage(decode=False)).cast_column("target.jpg", HFImage(decode=False))
    assert ds.num_rows == len(raw)
    seen = set()
    for row in ds:
        s = raw[row["__key__"]]
        seen.add(row["__key__"])
        assert set(row) == {"instructions.json", "json", "query.jpg", "target.jpg", "__key__", "__url__"}
        assert row["instructions.json"] == json.loads(s["instructions.json"])
        assert row["json"] == json.loads(s["json"])
        assert row["query.jpg"]["bytes"] == s["query.jpg"] and row["target.jpg"]["bytes"] == s["target.jpg"]
        assert Path(row["__url__"]).name == Path(s["__url__"]).name
    assert seen == set(raw)


def test_every_sample_has_the_declared_provenance_fields(local_run):
    raw = raw_samples(local_run / "triplets")
    assert raw
    for s in raw.values():
        meta = json.loads(s["json"])
        assert set(meta) == set(PROVENANCE.names)
        pa.array([meta], type=PROVENANCE)  # every value has its declared type
        assert all(set(sp) == {"space", "score"} for sp in meta["spaces"])
        assert isinstance(json.loads(meta["query_meta"]), dict) and isinstance(json.loads(meta["target_meta"]), dict)


def test_datasets_loads_a_run_as_plain_webdataset_and_through_its_card(local_run, tmp_path):
    import datasets

    triplets = local_run / "triplets"
    raw = raw_samples(triplets)
    assert len(raw) == triplet_count(local_run) > 0  # one sample per index.jsonl row

    plain = datasets.load_dataset("webdataset", data_files=str(triplets / "triplets-*.tar"), split="train", cache_dir=str(tmp_path / "a"))
    assert_loaded_as_written(plain, raw)

    carded = datasets.load_dataset(str(triplets), split="train", cache_dir=str(tmp_path / "b"))  # configs + typed features
    assert_loaded_as_written(carded, raw)
    assert carded.features["json"]["spaces"] == datasets.List({"space": datasets.Value("string"), "score": datasets.Value("float64")})
    assert carded.info.splits["train"].num_examples == len(raw)


def test_the_card_states_licences_and_the_toy_models_that_wrote_the_text(local_run):
    card = (local_run / "triplets" / "README.md").read_text()
    front = yaml.safe_load(card.split("---", 2)[1])
    assert front["license"] == "mit" and front["source_license"] == "unknown"  # the defaults: no licence claimed for the images
    assert front["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": "triplets-*.tar"}]}]
    assert "CC BY" not in card
    config = yaml.safe_load((local_run / "config.yaml").read_text())["annotate"]
    for role in ("describer", "instructor"):
        model = config[role]["model"]
        assert is_toy_model(model)  # the test's text models are built by demo/toy_models.py, as the demo's are
        assert f"| {role} | `{model}` (toy model) | not stated |" in card
    assert "**Text from toy models.** The describer `" in card and "are tiny demo models" in card


def test_the_card_types_samples_without_hard_negatives_like_the_others(tmp_path, corpus):
    """A reader inferring types from the first samples cannot type an empty list; the card's declared types can."""
    import datasets

    rows = annotated(tmp_path, corpus)
    first = [annotation(r["query_id"], r["hard_negatives"][0]["id"], [], 20 + k) for k, r in enumerate(rows[:6])]  # none
    write_annotations(tmp_path, first + rows)
    out = tmp_path / "triplets"
    run_write(tmp_path, out, maxcount=20)
    raw = raw_samples(out)
    assert [json.loads(s["json"])["hard_negatives"] for s in list(raw.values())[:6]] == [[]] * 6
    shard_bytes = sum(p.stat().st_size for p in out.glob("triplets-*.tar"))
    front = card_metadata(WriteSettings().model_dump(), len(raw), shard_bytes)
    (out / "README.md").write_text("---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n")

    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf"))
    assert_loaded_as_written(ds, raw)
    assert sum(1 for r in ds if r["json"]["hard_negatives"]) == 6


def test_toy_models_are_told_by_their_builders_marker(tmp_path):
    toy, real, broken = tmp_path / "toy", tmp_path / "real", tmp_path / "broken"
    for folder in (toy, real, broken):
        folder.mkdir()
    (toy / "demo_training.json").write_text(json.dumps({"toy_model": True, "steps": 10}))
    (real / "demo_training.json").write_text(json.dumps({"toy_model": False}))
    (broken / "demo_training.json").write_text("{not json")
    assert is_toy_model(str(toy))
    assert not any(is_toy_model(m) for m in (str(real), str(broken), str(tmp_path / "missing"), "Qwen/Qwen2-VL-7B-Instruct"))


def test_a_text_models_licence_comes_from_the_config_or_its_model_card(tmp_path):
    carded, other, bare = tmp_path / "carded", tmp_path / "other", tmp_path / "bare"
    for folder in (carded, other, bare):
        folder.mkdir()
    (carded / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: [en]\n---\n# a model\n")
    (other / "README.md").write_text("---\nlicense: other\nlicense_name: llama3\n---\n")
    (bare / "README.md").write_text("# no front matter\n")
    assert model_license(str(carded), {}) == "apache-2.0"
    assert model_license(str(other), {}) == "llama3"
    assert model_license(str(bare), {}) is None and model_license("meta-llama/Meta-Llama-3-8B-Instruct", {}) is None
    assert model_license("meta-llama/Meta-Llama-3-8B-Instruct", {"meta-llama/Meta-Llama-3-8B-Instruct": "llama3"}) == "llama3"
    assert model_license(str(carded), {str(carded): "mit"}) == "mit"  # the config overrides the card
    assert model_license(str(bare), {os.path.relpath(bare): "cc-by-nc-4.0"}) == "cc-by-nc-4.0"  # the config's folder, relative
