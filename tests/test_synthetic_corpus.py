import collections
import glob
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from demo.corpus import make_corpus

REPO = Path(__file__).resolve().parents[1]
IMAGES, SHARD_SIZE = 200, 64
FIELDS = ["key", "url", "caption", "re_caption", "width", "height", "attributes"]
ATTRIBUTE_FIELDS = ["family", "variant", "copy", "background", "objects", "layout", "lighting", "effect", "style"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    summary = make_corpus(out, IMAGES, seed=0, shard_size=SHARD_SIZE)
    return out, summary


@pytest.fixture(scope="module")
def samples(corpus):
    """key -> {"jpg": bytes, "json": dict, "txt": str}, read straight from the tars."""
    out, _ = corpus
    found = {}
    for path in sorted(out.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                value = json.loads(data) if ext == "json" else data.decode() if ext == "txt" else data
                found.setdefault(key, {})[ext] = value
    return found


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_summary_and_layout(corpus):
    out, summary = corpus
    assert summary["images"] == IMAGES
    assert summary["shards"] == 4
    assert summary["exact_duplicates"] >= 1 and summary["near_duplicates"] >= 5
    assert sorted(p.name for p in out.iterdir()) == [f"{i:05d}{s}" for i in range(4) for s in (".tar", "_stats.json")]
    stats = json.loads((out / "00003_stats.json").read_text())
    assert stats["count"] == stats["successes"] == IMAGES - 3 * SHARD_SIZE


def test_same_seed_is_byte_identical_even_under_another_hash_seed(corpus, tmp_path):
    out, _ = corpus
    again = tmp_path / "again"
    code = f"from demo.corpus import make_corpus; make_corpus({str(again)!r}, {IMAGES}, 0, {SHARD_SIZE})"
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO)
    assert _files(again) == _files(out)


def test_other_seed_differs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_corpus(a, 30, seed=1)
    make_corpus(b, 30, seed=2)
    assert _files(a)["00000.tar"] != _files(b)["00000.tar"]


def test_tar_members_are_sorted_triples_with_fixed_headers(corpus):
    out, _ = corpus
    for shard, path in enumerate(sorted(out.glob("*.tar"))):
        with tarfile.open(path) as tar:
            members = tar.getmembers()
        names = [m.name for m in members]
        keys = sorted({n.split(".")[0] for n in names})
        assert names == [f"{k}.{ext}" for k in keys for ext in ("jpg", "json", "txt")]
        assert keys == [f"{shard * 10**4 + i:09d}" for i in range(len(keys))]
        headers = {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members}
        assert headers == {(1_700_000_000, 0, 0, "", "", 0o644)}


def test_json_fields(samples):
    assert len(samples) == IMAGES
    for key, sample in samples.items():
        meta = sample["json"]
        assert list(meta) == FIELDS
        assert list(meta["attributes"]) == ATTRIBUTE_FIELDS
        assert meta["key"] == key
        assert meta["url"].startswith("https://") and ".example." in meta["url"].split("/")[2]
        assert sample["txt"] == meta["caption"]
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert image.format == "JPEG" and image.size == (meta["width"], meta["height"])
        assert 150 <= meta["width"] <= 400 and 150 <= meta["height"] <= 400
        for group in meta["attributes"]["objects"]:
            assert set(group) == {"kind", "category", "colour", "count"} and 1 <= group["count"] <= 3
            assert (group["colour"] is None) == (group["category"] == "photo")


def test_webdataset_reads_it_back(corpus):
    webdataset = pytest.importorskip("webdataset")
    out, _ = corpus
    dataset = webdataset.WebDataset(sorted(glob.glob(str(out / "*.tar"))), shardshuffle=False)
    seen = [(s["__key__"], json.loads(s["json"])["key"]) for s in dataset]
    assert len(seen) == IMAGES and all(a == b for a, b in seen)


def _originals(samples):
    return {k: s["json"] for k, s in samples.items() if s["json"]["attributes"]["copy"] is None}


def test_families_share_everything_but_their_variation(samples):
    families = collections.defaultdict(list)
    for meta in _originals(samples).values():
        families[meta["attributes"]["family"]].append(meta["attributes"])
    assert any(len(m) == 1 for m in families.values()), "no unrelated singletons"
    assert any(len(m) >= 4 for m in families.values()), "no large families"
    area = {"object_colour": "objects", "object_kind": "objects", "object_count": "objects",
            "background": "background", "lighting": "lighting", "layout": "layout"}
    for members in families.values():
        bases = [a for a in members if a["variant"] == "base"]
        assert len(bases) == 1
        for attrs in members:
            if attrs is bases[0]:
                continue
            changed = {area[v] for v in attrs["variant"].split("+")}
            fields = ("objects", "background", "lighting", "layout", "effect")
            differing = {f for f in fields if attrs[f] != bases[0][f]}
            assert differing and differing <= changed, (attrs, bases[0])
            assert len(attrs["objects"]) == len(bases[0]["objects"])


def test_exact_duplicates_have_identical_bytes(samples):
    dups = [s for s in samples.values() if (s["json"]["attributes"]["copy"] or {}).get("kind") == "exact_duplicate"]
    assert dups
    for dup in dups:
        source = samples[dup["json"]["attributes"]["copy"]["of"]]
        assert dup["jpg"] == source["jpg"] and dup["json"]["key"] != source["json"]["key"]
        assert dup["json"]["caption"] == source["json"]["caption"]
        assert dup["json"]["re_caption"] == source["json"]["re_caption"]


def test_near_duplicates_keep_scene_and_captions(samples):
    near = [s for s in samples.values() if (s["json"]["attributes"]["copy"] or {}).get("kind") == "near_duplicate"]
    assert len(near) >= 5
    for dup in near:
        source = samples[dup["json"]["attributes"]["copy"]["of"]]
        assert source["json"]["attributes"]["copy"] is None and dup["jpg"] != source["jpg"]
        assert dup["json"]["caption"] == source["json"]["caption"]
        scene = {k: v for k, v in dup["json"]["attributes"].items() if k != "copy"}
        assert scene == {k: v for k, v in source["json"]["attributes"].items() if k != "copy"}
    assert len({d["json"]["attributes"]["copy"]["transform"] for d in near}) >= 3


def test_captionless_samples_exist(samples):
    empty = [s for s in samples.values() if s["json"]["caption"] == ""]
    assert empty
    assert all(s["txt"] == "" and s["json"]["re_caption"] == "" for s in empty)


def test_captions_describe_the_attributes(samples):
    captioned = [s["json"] for s in samples.values() if s["json"]["caption"]]
    assert len(set(m["caption"] for m in captioned)) > len(captioned) * 0.8
    for meta in captioned:
        attrs = meta["attributes"]
        assert 30 <= len(meta["re_caption"].split()) <= 80, meta["re_caption"]
        for text in (meta["caption"].lower(), meta["re_caption"].lower()):
            for group in attrs["objects"]:
                assert _mentions(text, group["kind"]), (group, text)
                if group["colour"]:
                    assert _mentions(text, f"{group['colour']} {group['kind']}"), (group, text)
            for colour in attrs["background"]["colours"]:
                assert _mentions(text, colour), (colour, text)


def _mentions(text: str, words: str) -> bool:
    return re.search(rf"\b{words}(s|es)?\b", text) is not None
