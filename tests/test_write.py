"""write: WebDataset shards that read back, the released index format, one copy of every image, same bytes twice."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import webdataset as wds
from PIL import Image

from stages import annotations, catalog, embeddings, pairs
from stages.ingest import CorpusSettings, IngestSettings, IngestStage
from stages.write import WriteSettings, WriteStage, image_key


def annotated(tmp_path, corpus) -> list[dict]:
    ingest = IngestStage(IngestSettings(corpus=CorpusSettings(paths=[str(corpus / "00000.tar")])), {}, tmp_path / "catalog")
    for u in ingest.plan()[0]:
        ingest.process(u)
    ids = catalog.read(tmp_path / "catalog", "00000", columns=["id"])["id"].to_pylist()
    rows = []
    for i in range(7):
        q, t = ids[i], ids[i + 10]
        rows.append(
            {
                "pair_id": pairs.pair_id(q, t), "query_id": q, "target_id": t,
                "spaces": [{"space": "caption", "score": 0.9}, {"space": "pattern", "score": 0.85}],
                "hard_negatives": [{"id": ids[20 + i], "score": 0.7}, {"id": ids[30 + i], "score": 0.6}],
                "status": "ok" if i < 6 else "rejected", "error": None if i < 6 else "instruct.too_few_instructions",
                "description": f"The query image and the target image share a scene ({i}).",
                "instructions": [f"first instruction {i}", f"second instruction {i}", f"third instruction {i}"] if i < 6 else None,
                "word_num": 70, "seed": 0, "describe_attempts": 1, "instruct_attempts": 1,
                "describer": "tiny-vlm", "instructor": "tiny-llm", "describe_prompt": "describe-v1", "instruct_prompt": "instruct-v1",
            }
        )  # fmt: skip
    (tmp_path / "ann").mkdir()
    annotations.write(tmp_path / "ann" / "queries-00000.parquet", rows)
    embeddings.write_manifest(tmp_path / "emb", "caption", {"kind": "text", "model": "minilm"})
    return rows


def run_write(tmp_path, out, **settings) -> WriteStage:
    stage = WriteStage(WriteSettings(**settings), {"catalog": tmp_path / "catalog", "annotations": tmp_path / "ann", "embeddings": tmp_path / "emb"}, out)
    for wave in range(3):
        for unit in stage.plan()[wave]:
            stage.process(unit)
    return stage


def digest(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_shards_read_back_with_webdataset(tmp_path, corpus):
    rows = annotated(tmp_path, corpus)
    out = tmp_path / "triplets"
    run_write(tmp_path, out, maxcount=4, image_side=128)
    shards = sorted(out.glob("*.tar"))
    assert [p.name for p in shards] == ["queries-00000-00000.tar", "queries-00000-00001.tar"]

    samples = list(wds.WebDataset([str(p) for p in shards], shardshuffle=False))
    assert len(samples) == 6  # the rejected pair is not written
    ok = {r["pair_id"]: r for r in rows if r["status"] == "ok"}
    for s in samples:
        r = ok[s["__key__"]]
        assert set(s) >= {"__key__", "query.jpg", "target.jpg", "instructions.json", "json"}
        assert json.loads(s["instructions.json"]) == r["instructions"]
        meta = json.loads(s["json"])
        assert meta["query_key"] == r["query_id"].split("/")[1] and meta["target_key"] == r["target_id"].split("/")[1]
        assert meta["spaces"] == {"caption": 0.9, "pattern": 0.85}
        assert [h["key"] for h in meta["hard_negatives"]] == [h["id"].split("/")[1] for h in r["hard_negatives"]]
        assert meta["models"] == {"describer": "tiny-vlm", "instructor": "tiny-llm", "spaces": {"caption": "minilm"}}
        assert meta["prompt_version"] == {"describe": "describe-v1", "instruct": "instruct-v1"}
        q = Image.open(io.BytesIO(s["query.jpg"]))
        assert max(q.size) == 128 and q.format == "JPEG"

    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert len(index) == 6
    first = ok[samples[0]["__key__"]]
    assert index[0] == {
        "q_img": f"images/{image_key(first['query_id'])}.jpg",
        "q_text": first["instructions"],
        "t_img": f"images/{image_key(first['target_id'])}.jpg",
        "hns": [f"images/{image_key(first['query_id'])}.jpg"] + [f"images/{image_key(h['id'])}.jpg" for h in first["hard_negatives"]],
    }
    # every image the index names is in the image shards, exactly once
    named = {p for row in index for p in [row["q_img"], row["t_img"], *row["hns"]]}
    members = []
    for p in sorted((out / "images").glob("*.tar")):
        with tarfile.open(p) as tar:
            members += ["images/" + m.name for m in tar.getmembers()]
    assert sorted(members) == sorted(named)


def test_same_input_same_bytes(tmp_path, corpus):
    annotated(tmp_path, corpus)
    run_write(tmp_path, tmp_path / "a", maxcount=3)
    run_write(tmp_path, tmp_path / "b", maxcount=3)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    with tarfile.open(next((tmp_path / "a").glob("*.tar"))) as tar:
        assert {(m.mtime, m.uname, m.gname) for m in tar.getmembers()} == {(0, "", "")}
