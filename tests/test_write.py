"""write: WebDataset shards that read back, the released index format, one copy of every image, same bytes twice."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile

import webdataset as wds
from conftest import captions_of
from PIL import Image

from stages import annotations, catalog, embeddings, pairs
from stages.base import Stats
from stages.ingest import CorpusSettings, IngestSettings, IngestStage
from stages.write import WriteSettings, WriteStage, encode_jpeg, image_key, written_size


def annotated(tmp_path, corpus) -> list[dict]:
    settings = IngestSettings(corpus=CorpusSettings(paths=[str(corpus / "00000.tar")], keep_fields=["uid", "attributes"]))
    ingest = IngestStage(settings, {}, tmp_path / "catalog")
    for u in ingest.plan()[0]:
        ingest.process(u)
    captions_of(tmp_path / "catalog")
    ids = catalog.read(tmp_path / "catalog", "00000", columns=["id"])["id"].to_pylist()
    rows = [annotation(ids[i], ids[i + 10], [ids[20 + i], ids[30 + i]], i, ok=i < 6) for i in range(7)]
    write_annotations(tmp_path, rows)
    return rows


def annotation(q: str, t: str, negatives: list[str], i: int, ok: bool = True) -> dict:
    return {
        "pair_id": pairs.pair_id(q, t), "query_id": q, "target_id": t,
        "spaces": [{"space": "caption", "score": 0.9}, {"space": "pattern", "score": 0.85}],
        "hard_negatives": [{"id": h, "score": 0.7 - 0.1 * k} for k, h in enumerate(negatives)],
        "status": "ok" if ok else "rejected", "error": None if ok else "instruct.too_few_instructions",
        "description": f"The query image and the target image share a scene ({i}).",
        "instructions": [f"first instruction {i}", f"second instruction {i}", f"third instruction {i}"] if ok else None,
        "word_num": 70, "seed": 0, "describe_attempts": 1, "instruct_attempts": 1,
        "describer": "tiny-vlm", "instructor": "tiny-llm", "describe_prompt": "describe-v1", "instruct_prompt": "instruct-v1",
    }  # fmt: skip


def write_annotations(tmp_path, rows: list[dict]) -> None:
    (tmp_path / "ann").mkdir(exist_ok=True)
    annotations.write(tmp_path / "ann" / "queries-00000.parquet", rows)
    embeddings.write_manifest(tmp_path / "emb", "caption", {"kind": "text", "model": "minilm"})


def run_write(tmp_path, out, **settings) -> WriteStage:
    return run_write_stats(tmp_path, out, **settings)[0]


def inputs(tmp_path, out) -> dict:
    return {"catalog": tmp_path / "catalog", "captions": tmp_path / "captions", "annotations": tmp_path / "ann", "embeddings": tmp_path / "emb", "scratch": tmp_path / f"scratch-{out.name}"}


def run_write_stats(tmp_path, out, **settings) -> tuple[WriteStage, Stats]:
    """Every wave, each planned after the one before (as the runner does), then the stage's finish."""
    stage = WriteStage(WriteSettings(**settings), inputs(tmp_path, out), out)
    stats = Stats()
    for wave in range(3):
        for unit in stage.plan()[wave]:
            stats += stage.process(unit)
    stage.finish()
    assert not stage.inputs["scratch"].exists()  # no scratch left behind
    return stage, stats


def read_index(out) -> list[dict]:
    return [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]


def image_members(out) -> dict[str, bytes]:
    members = {}
    for p in sorted((out / "images").glob("*.tar")):
        with tarfile.open(p) as tar:
            for m in tar.getmembers():
                assert "images/" + m.name not in members
                members["images/" + m.name] = tar.extractfile(m).read()
    return members


def digest(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_shards_read_back_with_webdataset(tmp_path, corpus):
    rows = annotated(tmp_path, corpus)
    out = tmp_path / "triplets"
    run_write(tmp_path, out, maxcount=4, image_side=128)
    shards = sorted(out.glob("*.tar"))
    assert [p.name for p in shards] == ["triplets-00000-00000.tar", "triplets-00000-00001.tar"]

    samples = list(wds.WebDataset([str(p) for p in shards], shardshuffle=False))
    assert len(samples) == 6  # the rejected pair is not written
    ok = {r["pair_id"]: r for r in rows if r["status"] == "ok"}
    source = {r["id"]: r for r in catalog.read(tmp_path / "catalog", "00000").to_pylist()}
    for s in samples:
        r = ok[s["__key__"]]
        assert set(s) >= {"__key__", "query.jpg", "target.jpg", "instructions.json", "json"}
        assert json.loads(s["instructions.json"]) == r["instructions"]
        meta = json.loads(s["json"])
        assert meta["query_key"] == r["query_id"].split("/")[1] and meta["target_key"] == r["target_id"].split("/")[1]
        assert meta["spaces"] == [{"space": "caption", "score": 0.9}, {"space": "pattern", "score": 0.85}]
        assert [h["key"] for h in meta["hard_negatives"]] == [h["id"].split("/")[1] for h in r["hard_negatives"]]
        assert meta["models"] == {"describer": "tiny-vlm", "instructor": "tiny-llm", "spaces": [{"space": "caption", "model": "minilm"}]}
        for role, image_id in (("query", r["query_id"]), ("target", r["target_id"])):  # the corpus's url and kept fields
            assert meta[f"{role}_url"] == source[image_id]["url"] and meta[f"{role}_url"].startswith("https://")
            kept = json.loads(meta[f"{role}_meta"])
            assert set(kept) == {"attributes"} and kept == json.loads(source[image_id]["meta"])  # the corpus has no uid
        assert meta["prompt_version"] == {"describe": "describe-v1", "instruct": "instruct-v1"}
        q = Image.open(io.BytesIO(s["query.jpg"]))
        assert max(q.size) == 128 and q.format == "JPEG"

    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert len(index) == 6
    first = ok[samples[0]["__key__"]]
    q, t = source[first["query_id"]], source[first["target_id"]]
    assert index[0] == {
        "q_img": f"images/{image_key(first['query_id'])}.jpg",
        "q_text": first["instructions"],
        "t_img": f"images/{image_key(first['target_id'])}.jpg",
        "hns": [f"images/{image_key(first['query_id'])}.jpg"] + [f"images/{image_key(h['id'])}.jpg" for h in first["hard_negatives"]],
        "q_url": q["url"], "q_meta": json.loads(q["meta"]), "t_url": t["url"], "t_meta": json.loads(t["meta"]),
    }  # fmt: skip
    assert all(list(row)[:4] == ["q_img", "q_text", "t_img", "hns"] for row in index)  # the released fields first, in order
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


def test_image_keys_are_one_to_one():
    # ids that need no sanitising keep their characters, "/" becoming "_", as in the demo's index
    assert image_key("00000/000000001") == "00000_000000001"
    assert image_key("shard-a/key_1-x") == "shard-a_key_1-x"
    assert image_key("name") == "name"
    colliding = [
        ("s/a.b", "s/a_b"),  # folder keys with dots
        ("k#2", "k_2"),  # parquet keys can be anything
        ("s/sub/x", "s/sub_x"),  # relative paths as keys
        ("a_b/c", "a/b_c"),  # shard names may hold "_"
        ("k/2", "k_2"),
        ("s/x.y", "s/x_y_" + hashlib.blake2b(b"s/x.y", digest_size=8).hexdigest()),  # a plain id shaped like a hashed key
        ("s/ü", "s/_"),
        ("s/A", "s/a"),
    ]
    for a, b in colliding:
        assert image_key(a) != image_key(b), (a, b)
    ids = [i for pair in colliding for i in pair] + ["00000/000000001", "name", "s/a.b.c", "s/a..b", "", "/", "s/"]
    keys = [image_key(i) for i in ids]
    assert len(set(keys)) == len(set(ids))
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", k) for k in keys)  # a tar member stem: no dots or slashes
    assert image_key("s/a.b") == image_key("s/a.b")


def test_ids_that_sanitise_alike_get_their_own_image(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    colours = {"a.b": (255, 0, 0), "a_b": (0, 255, 0), "sub/x": (0, 0, 255), "sub_x": (255, 255, 0)}
    for key, colour in colours.items():
        Image.new("RGB", (64, 48), colour).save(folder / f"{key}.jpg", quality=95)
        (folder / f"{key}.txt").write_text(f"a photo coloured {colour}")
    ingest = IngestStage(IngestSettings(corpus=CorpusSettings(paths=[str(folder)])), {}, tmp_path / "catalog")
    for u in ingest.plan()[0]:
        ingest.process(u)
    captions_of(tmp_path / "catalog")
    (shard,) = catalog.shards(tmp_path / "catalog")
    ids = {i.split("/", 1)[1]: i for i in catalog.read(tmp_path / "catalog", shard, columns=["id"])["id"].to_pylist()}
    assert set(ids) == set(colours)
    write_annotations(tmp_path, [annotation(ids["a.b"], ids["a_b"], [ids["sub/x"], ids["sub_x"]], 0)])
    out = tmp_path / "triplets"
    run_write(tmp_path, out, image_side=32)

    (row,) = read_index(out)
    named = [row["q_img"], row["t_img"], *row["hns"][1:]]
    assert len(set(named)) == 4 and row["hns"][0] == row["q_img"]
    members = image_members(out)
    assert sorted(members) == sorted(named)
    for path, key in zip(named, ["a.b", "a_b", "sub/x", "sub_x"]):  # each path holds its own image
        pixel = Image.open(io.BytesIO(members[path])).convert("RGB").getpixel((16, 12))
        assert all(abs(p - c) < 16 for p, c in zip(pixel, colours[key])), (path, key, pixel)


def test_index_drops_hard_negatives_whose_image_was_not_written(tmp_path, corpus):
    rows = annotated(tmp_path, corpus)
    bad = rows[0]["hard_negatives"][0]["id"]  # a hard negative only: the triplet shards never read it
    rows[1]["hard_negatives"].append({"id": "00000/not-in-the-catalog", "score": 0.5})
    write_annotations(tmp_path, rows)
    table = catalog.read(tmp_path / "catalog", "00000", ok_only=False)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not an image" * 100)
    cat_rows = [dict(r, path=str(garbage), offset=0, size=1000) if r["id"] == bad else r for r in table.to_pylist()]
    catalog.write(catalog.catalog_file(tmp_path / "catalog", "00000"), cat_rows)

    out = tmp_path / "triplets"
    _, stats = run_write_stats(tmp_path, out, maxcount=4)
    assert stats.output == 6
    assert stats.counters["images_unreadable"] == 1
    assert stats.counters["hard_negatives_dropped"] == 2  # the unreadable one, and the one missing from the catalog
    index = read_index(out)
    by_query = {row["q_img"]: row for row in index}
    first = by_query[f"images/{image_key(rows[0]['query_id'])}.jpg"]
    assert first["hns"] == [first["q_img"], f"images/{image_key(rows[0]['hard_negatives'][1]['id'])}.jpg"]
    second = by_query[f"images/{image_key(rows[1]['query_id'])}.jpg"]
    assert len(second["hns"]) == 3  # the query and its two catalogued negatives
    named = {p for row in index for p in [row["q_img"], row["t_img"], *row["hns"]]}
    assert sorted(image_members(out)) == sorted(named)  # the index names only images that were written


def test_each_image_is_encoded_once_per_unit(tmp_path, corpus, monkeypatch):
    rows = annotated(tmp_path, corpus)
    q = rows[0]["query_id"]
    extra = [annotation(q, r["target_id"], [], 10 + k) for k, r in enumerate(rows[1:4])]  # the same query in four pairs
    write_annotations(tmp_path, rows + extra)
    encoded = []
    jpeg = WriteStage._jpeg

    def counting(self, row):
        encoded.append(row["id"])
        return jpeg(self, row)

    monkeypatch.setattr(WriteStage, "_jpeg", counting)
    stage = WriteStage(WriteSettings(maxcount=4), inputs(tmp_path, tmp_path / "a"), tmp_path / "a")
    stage.process(stage.plan()[0][0])
    assert sorted(encoded) == sorted({i for r in rows[:6] + extra for i in (r["query_id"], r["target_id"])})

    import stages.write

    monkeypatch.setattr(stages.write, "JPEG_CACHE_BYTES", 0)  # (almost) no reuse: the same bytes
    run_write(tmp_path, tmp_path / "b", maxcount=4)
    run_write(tmp_path, tmp_path / "a", maxcount=4)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")


def test_written_jpegs_are_encode_jpeg(tmp_path, corpus):
    annotated(tmp_path, corpus)
    stage = run_write(tmp_path, tmp_path / "out", image_side=96, jpeg_quality=80)
    (row,) = catalog.lookup(tmp_path / "catalog", {"00000/000000003"}, ["path", "offset", "size"]).values()
    original = catalog.read_image_bytes(catalog.ImageRef(row["id"], row["path"], row["offset"], row["size"]))
    data = encode_jpeg(Image.open(io.BytesIO(original)), 96, 80)
    assert stage._jpeg(row) == data
    img = Image.open(io.BytesIO(data))
    assert img.format == "JPEG" and max(img.size) == 96


def test_smaller_images_keep_their_size_unless_upscale_is_set(tmp_path, corpus):
    assert written_size((300, 200), 512, upscale=False) == (300, 200)
    assert written_size((300, 200), 512, upscale=True) == (512, 341)
    assert written_size((1024, 512), 512, upscale=False) == (512, 256)
    assert written_size((8000, 2), 512, upscale=False) == (512, 1) and written_size((2, 2), 1, upscale=True) == (1, 1)

    annotated(tmp_path, corpus)  # the corpus's images are 200 to 400 pixels wide
    run_write(tmp_path, tmp_path / "kept", image_side=512)
    run_write(tmp_path, tmp_path / "up", image_side=512, upscale=True)
    source = {image_key(r["id"]): (r["width"], r["height"]) for r in catalog.read(tmp_path / "catalog", "00000").to_pylist()}
    kept, up = image_members(tmp_path / "kept"), image_members(tmp_path / "up")
    assert kept.keys() == up.keys() and kept
    for path in kept:
        original = source[path[len("images/") : -len(".jpg")]]
        assert max(original) < 512 and Image.open(io.BytesIO(kept[path])).size == original
        assert Image.open(io.BytesIO(up[path])).size == written_size(original, 512, upscale=True)


def test_card_only_settings_leave_the_written_bytes_and_their_fingerprint_alone(tmp_path, corpus):
    annotated(tmp_path, corpus)
    plain = run_write(tmp_path, tmp_path / "a")
    licensed = run_write(tmp_path, tmp_path / "b", license="cc-by-4.0", source_license="cc-by-4.0", model_licenses={"tiny-vlm": "mit"})
    assert plain.reuse_key() == licensed.reuse_key()  # changing a licence does not redo the stage
    assert digest(tmp_path / "a") == digest(tmp_path / "b")


def test_units_are_sized_by_work_not_by_the_files_above(tmp_path, corpus):
    """7 annotated pairs in one file: 3 per unit gives 3 triplet units; 5 images per unit, several image units.
    The index and every image are the same as with one unit each, and no image is written twice."""
    annotated(tmp_path, corpus)
    one = tmp_path / "one"
    run_write(tmp_path, one, maxcount=100)
    many = tmp_path / "many"
    stage = run_write(tmp_path, many, maxcount=2, triplets_per_unit=3, images_per_unit=5)
    triplet_units = stage.plan()[0]
    assert len(triplet_units) == 3 and [u.items for u in triplet_units] == [3, 3, 1]
    buckets = {p.name.split("-")[0] for p in (many / "images").glob("*.tar")}
    assert len(buckets) >= 3  # image units from an upper bound on distinct images (each unit counts its own), 5 per unit
    assert read_index(many) == read_index(one)
    assert image_members(many) == image_members(one)  # image_members asserts each appears once
