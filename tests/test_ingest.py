"""ingest: every input sample is catalogued as ok or rejected with its reason, for every corpus layout."""

from __future__ import annotations

import errno
import gc
import gzip
import io
import json
import logging
import os
import tarfile
import random
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import jpeg_bytes, write_tar
from PIL import Image

from pipeline import runner
from pipeline.config import load_config
from stages import catalog
from stages.base import is_transient
from stages.corpus.readers import CorpusError
from stages.ingest import CorpusSettings, IngestSettings, IngestStage


def ingest(tmp_path: Path, paths: list[str], **kw) -> tuple[IngestStage, dict]:
    corpus_kw = {k: kw.pop(k) for k in ("format", "parquet") if k in kw}
    stage = IngestStage(IngestSettings(corpus=CorpusSettings(paths=paths, **corpus_kw), **kw), {}, tmp_path / "catalog")
    stage.check()
    stats = {}
    for unit in stage.plan()[0]:
        stats[unit.id] = stage.process(unit)
    return stage, stats


def rows(tmp_path: Path) -> dict[str, dict]:
    """Catalog rows by id without the shard prefix ("key", or "key#2" for a repeated key)."""
    out = {}
    for shard in catalog.shards(tmp_path / "catalog"):
        for r in catalog.read(tmp_path / "catalog", shard, ok_only=False).to_pylist():
            out[r["id"].split("/", 1)[1]] = r
    return out


def png_bomb() -> bytes:
    """A PNG whose header claims 100,000 x 100,000 pixels: decoding it would need 30 GB."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def test_bad_samples_are_rejected_with_reasons(tmp_path):
    good = jpeg_bytes()
    meta = lambda key, **kw: json.dumps({"key": key, "caption": f"caption {key}", **kw}).encode()  # noqa: E731
    tar = write_tar(
        tmp_path / "00000.tar",
        [
            ("ok.jpg", good), ("ok.json", meta("ok", re_caption="a detailed caption")),
            ("truncated.jpg", good[: len(good) // 2]), ("truncated.json", meta("truncated")),
            ("empty.jpg", b""), ("empty.json", meta("empty")),
            ("text.jpg", b"this is not an image at all"), ("text.json", meta("text")),
            ("noimage.json", meta("noimage")), ("noimage.txt", b"a caption without an image"),
            ("bomb.png", png_bomb()), ("bomb.json", meta("bomb")),
            ("tiny.jpg", jpeg_bytes(size=(8, 8))),
            ("badjson.jpg", good), ("badjson.json", b"{not json"),
            ("nocaption.jpg", jpeg_bytes(colour=(1, 2, 3))),
            ("ok.jpg", good),  # the same key again, later in the shard
        ],
    )  # fmt: skip
    _, stats = ingest(tmp_path, [str(tar)])
    by_key = rows(tmp_path)
    reasons = {k: r["error"] for k, r in by_key.items() if r["status"] == "rejected"}
    assert reasons == {
        "truncated": "truncated_image",
        "empty": "empty_image",
        "text": "not_an_image",
        "noimage": "no_image",
        "bomb": "too_many_pixels",
        "tiny": "too_small",
        "badjson": "invalid_json",
        "ok#2": "duplicate_key",
    }
    s = stats["00000"]
    assert s.input == 10 == s.output + sum(s.rejected.values()) == len(by_key)
    ok = by_key["ok"]
    assert ok["status"] == "ok" and ok["caption"] == "caption ok" and ok["re_caption"] == "a detailed caption"
    assert (ok["width"], ok["height"]) == (64, 48)
    assert by_key["nocaption"]["status"] == "ok" and by_key["nocaption"]["caption"] is None
    assert s.counters["captionless"] == 1
    # accepted rows locate their bytes inside the source tar: no copy of the corpus
    assert catalog.read_image_bytes(catalog.ImageRef("ok", ok["path"], ok["offset"], ok["size"])) == good
    assert ok["path"] == str(tar.resolve())


def test_txt_caption_and_pixel_limit(tmp_path):
    tar = write_tar(tmp_path / "a.tar", [("k1.jpg", jpeg_bytes((100, 100))), ("k1.txt", b"a red square\n")])
    ingest(tmp_path, [str(tar)], max_pixels=5_000)
    assert rows(tmp_path)["k1"]["error"] == "too_many_pixels"
    ingest(tmp_path, [str(tar)])
    assert rows(tmp_path)["k1"]["caption"] == "a red square"


def test_compressed_tar_images_are_copied_to_an_image_store(tmp_path):
    raw = write_tar(tmp_path / "raw.tar", [("k1.jpg", jpeg_bytes()), ("k1.txt", b"red")])
    gz = tmp_path / "c.tar.gz"
    gz.write_bytes(gzip.compress(raw.read_bytes()))
    raw.unlink()
    ingest(tmp_path, [str(gz)])
    r = rows(tmp_path)["k1"]
    assert r["status"] == "ok" and r["path"].endswith("c.images.bin")
    assert catalog.read_image_bytes(catalog.ImageRef("k1", r["path"], r["offset"], r["size"])) == jpeg_bytes()


def test_parquet_corpus_with_bytes_and_hf_image_structs(tmp_path):
    good = jpeg_bytes()
    pq.write_table(
        pa.table({"key": ["a", "b", "c"], "caption": ["red", None, "blue"], "image": [good, b"junk", None]}),
        tmp_path / "p1.parquet",
    )
    pq.write_table(
        pa.table({"id": ["x"], "text": ["green"], "img": [{"bytes": good, "path": None}]}),
        tmp_path / "p2.parquet",
    )
    ingest(tmp_path, [str(tmp_path / "p1.parquet")])
    r = rows(tmp_path)
    assert (r["a"]["status"], r["b"]["error"], r["c"]["error"]) == ("ok", "not_an_image", "no_image")
    assert catalog.read_image_bytes(catalog.ImageRef("a", r["a"]["path"], r["a"]["offset"], r["a"]["size"])) == good

    cols = {"image": "img", "key": "id", "caption": "text"}
    ingest(tmp_path, [str(tmp_path / "p2.parquet")], parquet=cols)
    assert rows(tmp_path)["x"]["caption"] == "green"


def test_folder_corpus_with_sidecars(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    (root / "one.jpg").write_bytes(jpeg_bytes())
    (root / "one.txt").write_text("a caption from txt")
    (root / "sub" / "two.png").write_bytes(jpeg_bytes())  # wrong extension, still an image
    (root / "sub" / "two.json").write_text(json.dumps({"caption": "short", "re_caption": "long one"}))
    (root / "three.jpg").write_bytes(b"")
    ingest(tmp_path, [str(root)])
    r = rows(tmp_path)
    assert r["one"]["caption"] == "a caption from txt"
    assert r["sub/two"]["re_caption"] == "long one" and r["sub/two"]["status"] == "ok"
    assert r["three"]["error"] == "empty_image"


def test_truncated_shard_keeps_what_it_read_and_records_the_break(tmp_path):
    tar = write_tar(tmp_path / "t.tar", [(f"k{i}.jpg", jpeg_bytes(colour=(i, 0, 0))) for i in range(5)])
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2 + 100])
    _, stats = ingest(tmp_path, [str(tar)])
    s = stats["t"]
    assert s.rejected["unreadable_shard"] == 1 and s.output >= 1
    assert s.input == s.output + sum(s.rejected.values())


@pytest.mark.parametrize(
    "paths, message",
    [
        (["/nonexistent/corpus/*.tar"], "corpus path not found"),
        ([], "no corpus given"),
    ],
)
def test_missing_corpus_is_one_clear_error(tmp_path, paths, message):
    with pytest.raises(CorpusError, match=message):
        ingest(tmp_path, paths)
    assert not (tmp_path / "catalog").exists()


def test_empty_corpus_is_an_error_before_writing(tmp_path):
    empty = write_tar(tmp_path / "e.tar", [])
    with pytest.raises(CorpusError, match="corpus is empty"):
        ingest(tmp_path, [str(empty)])
    assert not (tmp_path / "catalog").exists()


def test_generated_corpus_ingests_whole(tmp_path, corpus):
    _, stats = ingest(tmp_path, [str(corpus / "*.tar")])
    assert sum(s.input for s in stats.values()) == 200
    assert sum(s.output for s in stats.values()) == 200
    assert sum(s.counters["captionless"] for s in stats.values()) >= 1


def test_image_reads_from_many_threads_and_files_stay_correct_and_close(tmp_path):
    """Decode threads read catalogued bytes at once from more files than one thread keeps open."""
    refs, want = [], {}
    for i in range(3 * 64):
        path = tmp_path / f"shard-{i}.bin"
        path.write_bytes(bytes([i % 251]) * 100 + f"image-{i}".encode())
        refs.append(catalog.ImageRef(f"s{i}/k", str(path), 100, len(f"image-{i}")))
        want[f"s{i}/k"] = f"image-{i}".encode()
    open_before = len(os.listdir("/proc/self/fd"))
    jobs = [r for _ in range(3) for r in refs]
    random.Random(0).shuffle(jobs)
    with ThreadPoolExecutor(4) as pool:  # each thread cycles through more files than it keeps open
        assert list(pool.map(catalog.read_image_bytes, jobs)) == [want[r.id] for r in jobs]
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == open_before  # the threads' files closed with them


def test_shard_names_that_sanitise_alike_get_distinct_ids(tmp_path):
    """"a b.tar" and "a_b.tar" both sanitise to "a_b": one shard's catalog must not overwrite the other's."""
    first = write_tar(tmp_path / "a b.tar", [("k1.jpg", jpeg_bytes())])
    second = write_tar(tmp_path / "a_b.tar", [("k2.jpg", jpeg_bytes(colour=(1, 2, 3)))])
    stage, stats = ingest(tmp_path, [str(first), str(second)])
    ids = [s.id for s in stage.shards()]
    assert len(set(ids)) == 2 == len(catalog.shards(tmp_path / "catalog"))
    assert {k: r["status"] for k, r in rows(tmp_path).items()} == {"k1": "ok", "k2": "ok"}


def test_folder_of_tgz_shards_is_a_webdataset_corpus(tmp_path):
    root = tmp_path / "shards"
    root.mkdir()
    raw = write_tar(tmp_path / "raw.tar", [("k1.jpg", jpeg_bytes()), ("k1.txt", b"red")])
    (root / "s0.tgz").write_bytes(gzip.compress(raw.read_bytes()))
    stage, _ = ingest(tmp_path, [str(root)])
    assert [(s.id, s.kind) for s in stage.shards()] == [("s0", "webdataset")]
    assert rows(tmp_path)["k1"]["caption"] == "red"


def test_folder_file_briefly_gone_fails_the_unit_for_a_retry_and_an_unreadable_one_is_rejected(tmp_path):
    """A file listed at planning and missing when read (a shared filesystem's hiccup) is transient: the unit
    fails, writes nothing, and succeeds once the file is back. A file that cannot be read for good is the
    sample's rejection."""
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(3):
        (root / f"k{i}.jpg").write_bytes(jpeg_bytes(colour=(i, 0, 0)))
    stage = IngestStage(IngestSettings(corpus=CorpusSettings(paths=[str(root)])), {}, tmp_path / "catalog")
    stage.check()
    (unit,) = stage.plan()[0]
    (root / "k1.jpg").rename(root / "away")  # vanished between planning and reading
    with pytest.raises(OSError) as e:
        stage.process(unit)
    assert is_transient(e.value) and list((tmp_path / "catalog").iterdir()) == []  # no catalog, no temporary file
    (root / "away").rename(root / "k1.jpg")
    s = stage.process(unit)
    assert {k: r["error"] for k, r in rows(tmp_path).items()} == {"k0": None, "k1": None, "k2": None} and s.output == 3

    (root / "k2.jpg").unlink()
    (root / "k2.jpg").mkdir()  # still there, but never readable as a file (EISDIR): not transient
    s = stage.process(unit)
    assert {k: r["error"] for k, r in rows(tmp_path).items()} == {"k0": None, "k1": None, "k2": "unreadable_file"}
    assert s.input == 3 == s.output + sum(s.rejected.values()) and s.rejected == {"unreadable_file": 1}


def test_a_transient_read_error_retries_the_unit_and_keeps_the_sample(tmp_path, monkeypatch, caplog):
    """EIO once while reading a tar member, through the runner and the local executor: the unit is retried
    and the sample is in the catalog, not rejected inside a unit marked done."""
    tar = write_tar(tmp_path / "s.tar", [(f"k{i}.jpg", jpeg_bytes(colour=(i, 0, 0))) for i in range(3)])
    real, failed = tarfile.TarFile.extractfile, []

    def flaky(self, member):  # the disk fails once under k1, as EIO on a shared filesystem does
        if getattr(member, "name", member) == "k1.jpg" and not failed:
            failed.append(member)
            raise OSError(errno.EIO, os.strerror(errno.EIO), self.name)
        return real(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", flaky)
    cfg = load_config(None, ["executor.kind=local"], corpus=[str(tar)])
    with caplog.at_level(logging.WARNING, logger="megasynth"):
        summary = runner.run(cfg, tmp_path / "run", only="ingest", progress=False)
    assert failed and "retrying (1 of" in caplog.text
    assert summary["ingest"]["done"] and summary["ingest"]["output"] == 3 and not summary["ingest"]["rejected"]
    table = catalog.read(tmp_path / "run" / "catalog", "s", ok_only=False)
    assert table["status"].to_pylist() == ["ok"] * 3 and table["key"].to_pylist() == ["k0", "k1", "k2"]


def test_units_carry_their_shard_whatever_the_listing_says_later(tmp_path):
    """A worker builds its own stage: a shard added to the corpus after planning must not shift what a unit reads."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_tar(corpus / "b.tar", [("kb.jpg", jpeg_bytes()), ("kb.txt", b"from b")])
    settings = IngestSettings(corpus=CorpusSettings(paths=[str(corpus / "*.tar")]))
    (unit,) = IngestStage(settings, {}, tmp_path / "catalog").plan()[0]
    write_tar(corpus / "a.tar", [("ka.jpg", jpeg_bytes()), ("ka.txt", b"from a")])  # sorts first now
    worker = IngestStage(settings, {}, tmp_path / "catalog")
    worker.process(unit)
    assert unit.id == "b" and catalog.read(tmp_path / "catalog", "b")["caption"].to_pylist() == ["from b"]


def test_parquet_image_paths_that_do_not_exist_are_that_rows_rejection(tmp_path):
    (tmp_path / "there.jpg").write_bytes(jpeg_bytes())
    pq.write_table(pa.table({"key": ["a", "b"], "path": ["there.jpg", "nowhere.jpg"]}), tmp_path / "p.parquet")
    ingest(tmp_path, [str(tmp_path / "p.parquet")], parquet={"image_path": "path"})
    assert {k: r["error"] for k, r in rows(tmp_path).items()} == {"a": None, "b": "image_file_missing"}


def test_duplicate_keys_are_rejected_without_decoding(tmp_path, monkeypatch):
    validated: list[str] = []
    validate = IngestStage._validate

    def spy(self, sample, row):
        validated.append(sample.key)
        return validate(self, sample, row)

    monkeypatch.setattr(IngestStage, "_validate", spy)
    tar = write_tar(tmp_path / "d.tar", [("k.jpg", jpeg_bytes()), ("other.jpg", jpeg_bytes()), ("k.jpg", jpeg_bytes())])
    ingest(tmp_path, [str(tar)])
    assert validated == ["k", "other"]
    assert rows(tmp_path)["k#2"]["error"] == "duplicate_key"


def test_failed_synthetic_shard_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    from demo.corpus import make_corpus

    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        make_corpus(tmp_path / "corpus", 2, shard_size=2, image_size=(64, 48))
    assert list((tmp_path / "corpus").iterdir()) == []  # a glob over the folder finds nothing half-written
