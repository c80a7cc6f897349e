"""The caption stage: a caption for images that have none, one caption rule for every later stage."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.config import ConfigError, load_config
from pipeline.runner import run
from stages import annotations, captions, embeddings, pairs
from stages.annotate import AnnotateSettings, AnnotateStage
from stages.caption import choose_caption, needs_caption


def test_one_rule_chooses_each_images_caption():
    row = {"caption": "alt text", "re_caption": "a long re-caption"}
    bare = {"caption": None, "re_caption": ""}
    use = ["re_caption", "caption"]
    assert choose_caption(row, use, "missing", None) == ("a long re-caption", "re_caption")
    assert choose_caption(row, ["caption"], "missing", None) == ("alt text", "caption")
    assert choose_caption(bare, use, "missing", "made up") == ("made up", "generated")
    assert choose_caption(bare, use, "off", None) == (None, None)
    assert choose_caption(row, use, "all", "made up") == ("made up", "generated")
    assert choose_caption(row, use, "all", None) == ("a long re-caption", "re_caption")  # the captioner failed on it
    assert [needs_caption(r, use, m) for r in (row, bare) for m in ("off", "missing", "all")] == [False, False, True, False, True, True]
    assert needs_caption({"caption": "alt", "re_caption": None}, ["re_caption"], "missing")  # only the fields in use count


def test_mode_all_needs_a_captioner():
    with pytest.raises(ConfigError, match="caption.*name a caption.captioner"):
        load_config(None, ["caption.mode=all"])


def _bare_folder(corpus: Path, out: Path, n: int) -> Path:
    """The corpus's first `n` images as plain files: no captions, no metadata."""
    out.mkdir(parents=True)
    with tarfile.open(corpus / "00000.tar") as tar:
        jpgs = [m for m in tar.getmembers() if m.name.endswith(".jpg")][:n]
        for m in jpgs:
            (out / Path(m.name).name).write_bytes(tar.extractfile(m).read())
    return out


@pytest.fixture(scope="module")
def bare_run(corpus, pipeline_config, text_models, tmp_path_factory) -> tuple[Path, dict]:
    """A folder of bare images through ingest, caption and embed, the demo's toy VLM as captioner."""
    root = tmp_path_factory.mktemp("bare")
    folder = _bare_folder(corpus, root / "images", 24)
    cfg = yaml.safe_load(pipeline_config.read_text())
    cfg["corpus"] = {"paths": [str(folder)]}
    cfg["caption"] = {"captioner": {"model": str(text_models["describer"]), "batch_size": 12, "max_new_tokens": 200, "device": "cpu"},
                      "words": [3, 160]}  # fmt: skip
    path = root / "bare.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = root / "run"
    config = load_config(path)
    for stage in ("ingest", "caption", "embed"):
        run(config, out, only=stage, progress=False)
    return out, cfg


def test_bare_images_get_captions_and_caption_vectors(bare_run):
    out, _ = bare_run
    table = pq.read_table(out / "captions").to_pylist()
    catalog_ok = pq.read_table(out / "catalog", filters=[("status", "=", "ok")]).num_rows
    assert len(table) == catalog_ok == 24
    generated = [r for r in table if r["source"] == captions.GENERATED]
    failed = [r for r in table if r["error"]]
    assert len(generated) + len(failed) == 24 and len(generated) >= 20, [r["error"] for r in failed]
    assert all(r["text"] and r["model"].endswith("describer") and r["prompt"] == "caption-v1" for r in generated)
    assert all(r["error"].startswith("caption.") and r["text"] is None for r in failed)
    # every captioned image has a vector in the text space, and only those
    ids = [str(i) for shard in embeddings.shards(out / "embeddings", "caption") for i in embeddings.load(out / "embeddings", "caption", shard)[0]]
    assert sorted(ids) == sorted(r["id"] for r in generated)
    status = json.loads((out / "_state" / "caption" / "stage.json").read_text())
    assert status["settings"]["mode"] == "missing"


def test_the_describer_is_shown_the_caption_each_image_is_known_by(bare_run, text_models, tmp_path):
    """Bare images: the describer's prompt holds the captions the caption stage wrote, not "(none)". The describer
    sits behind an OpenAI-compatible server on 127.0.0.1 that keeps every prompt it is sent."""
    from openai_server import OpenAIServer, load_generators

    out, _ = bare_run
    known = {r["id"]: r["text"] for r in pq.read_table(out / "captions").to_pylist() if r["text"]}
    ids = sorted(known)[:6]
    rows = [{"pair_id": pairs.pair_id(q, t), "query_id": q, "target_id": t, "spaces": [{"space": "semantic", "score": 0.9}],
             "hard_negatives": []} for q, t in zip(ids[0::2], ids[1::2])]  # fmt: skip
    (tmp_path / "pairs").mkdir()
    pairs.write(tmp_path / "pairs" / "queries-00000.parquet", rows)
    served = load_generators({"describer": (str(text_models["describer"]), True), "instructor": (str(text_models["instructor"]), False)})
    with OpenAIServer(served) as srv:
        common = {"backend": "openai", "base_url": srv.base_url, "max_retries": 0, "timeout_s": 120}
        settings = AnnotateSettings(describer={**common, "model": "describer", "max_new_tokens": 120},
                                    instructor={**common, "model": "instructor", "max_new_tokens": 100}, retries=0, seed=0)  # fmt: skip
        inputs = {"catalog": out / "catalog", "captions": out / "captions", "pairs": tmp_path / "pairs", "cache": tmp_path / "cache"}
        stage = AnnotateStage(settings, inputs, tmp_path / "annotations")
        stage.setup()
        stage.process(stage.plan()[0][0])
        shown = [text for model, text in srv.state.prompts if model == "describer"]
    assert len(shown) == len(rows) and all("(none)" not in text for text in shown)
    for r in rows:  # each pair's request names both of its images by their generated captions
        assert any(known[r["query_id"]] in text and known[r["target_id"]] in text for text in shown), r
    assert len(annotations.read(tmp_path / "annotations", "pairs-00000", ok_only=False)) == len(rows)


def test_captions_are_reused_from_the_answer_cache(bare_run, tmp_path):
    """A second run folder sharing the answer cache asks the captioner nothing and writes the same table."""
    out, cfg = bare_run
    cfg = {**cfg, "caption": {**cfg["caption"], "cache_dir": str(out / "cache")}}
    path = tmp_path / "again.yaml"
    path.write_text(yaml.safe_dump(cfg))
    again = tmp_path / "run"
    for stage in ("ingest", "caption"):
        run(load_config(path), again, only=stage, progress=False)
    units = [json.loads(p.read_text()) for p in (again / "_state" / "caption" / "units").glob("*.json")]
    assert sum(u["counters"].get("caption.generated", 0) for u in units) == 0
    assert sum(u["counters"].get("caption.cached", 0) for u in units) >= 24
    strip = lambda folder: sorted((r["id"], r["text"], r["source"]) for r in pq.read_table(folder / "captions").to_pylist())  # noqa: E731
    assert strip(again) == strip(out)


def test_corpus_captions_are_used_as_they_are(local_run):
    """The demo-shaped corpus has captions: nothing is generated, and the table holds re_caption, else caption."""
    table = pq.read_table(local_run / "captions").to_pylist()
    catalog = {r["id"]: r for r in pq.read_table(local_run / "catalog", filters=[("status", "=", "ok")]).to_pylist()}
    assert table and len(table) == len(catalog)
    for r in table:
        c = catalog[r["id"]]
        assert (r["text"], r["source"]) == choose_caption(c, ["re_caption", "caption"], "missing", None)
        assert r["model"] is None and r["attempts"] == 0
