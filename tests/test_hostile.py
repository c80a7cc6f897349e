"""One bad sample never stops a run: the image function every stage opens images with, a hostile shard
through ingest, and the pipeline over that shard mixed into a small corpus."""

from __future__ import annotations

import errno
import io
import logging
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
from hostile_corpus import ACCEPTED_SIZES, EPS, EXPECTED, animated_gif, encode, exif_rotated, gif_named_jpg, grey16, palette_with_transparency
from hostile_corpus import photo, rgba, write_hostile_tar
from PIL import Image

from pipeline import runner
from pipeline.config import load_config
from stages import catalog, embeddings
from stages.annotate import AnnotateSettings, AnnotateStage
from stages.embed import decode_pil
from stages.images import ImageRejected, open_image, plain_jpeg
from stages.ingest import CorpusSettings, IngestSettings, IngestStage
from stages.write import WriteSettings, WriteStage, encode_jpeg


def reason(data: bytes, **kw) -> str | None:
    try:
        open_image(data, **kw)
    except ImageRejected as e:
        return e.reason
    return None


def png_claiming(width: int, height: int) -> bytes:
    """An 8x8 PNG whose header claims another size: decoding it as claimed would need width*height bytes."""
    data = bytearray(encode(Image.new("L", (8, 8)), "PNG"))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


# --- the image function -------------------------------------------------------------------------


def test_postscript_named_jpg_is_refused_without_starting_a_program(monkeypatch):
    assert Image.open(io.BytesIO(EPS)).format == "EPS"  # PIL left to itself would take it (and run Ghostscript to load it)
    started = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **kw: started.append(a))
    assert reason(EPS) == "format_not_allowed" and started == []


@pytest.mark.parametrize(
    "data, kw, why",
    [
        (b"", {}, "empty_image"),
        (b"this is not an image at all", {}, "not_an_image"),
        (photo()[: len(photo()) // 2], {}, "truncated_image"),
        (png_claiming(100_000, 100_000), {"max_pixels": 64_000_000}, "too_many_pixels"),
        (encode(Image.new("RGB", (1, 1)), "PNG"), {"min_side": 16}, "too_small"),
        (encode(Image.new("RGB", (8000, 2)), "PNG"), {"min_side": 16}, "too_small"),
        (encode(Image.new("RGB", (8000, 2)), "PNG"), {"min_side": 1, "max_aspect_ratio": 20}, "too_elongated"),
    ],
    ids=["empty", "text", "truncated", "bomb", "one-pixel", "8000x2", "8000x2-elongated"],
)
def test_bad_images_get_their_own_reason(data, kw, why):
    assert reason(data, **kw) == why


def test_images_open_as_shown_in_rgb():
    gif = open_image(gif_named_jpg())  # GIF bytes named .jpg: the content decides
    assert gif.mode == "RGB" and gif.getpixel((5, 5)) == (0, 128, 0)
    grey = open_image(grey16())  # 16-bit scaled to 8, not clipped to white
    assert Image.open(io.BytesIO(grey16())).mode.startswith("I;16") and grey.getpixel((5, 5)) == (191, 191, 191)
    pal = open_image(palette_with_transparency())  # the transparent index shows the background, not its palette red
    assert pal.getpixel((5, 5)) == (255, 255, 255) and pal.getpixel((40, 5)) == (0, 0, 255)
    assert open_image(rgba()).getpixel((5, 5)) == (255, 255, 255)
    animation = animated_gif()
    assert Image.open(io.BytesIO(animation)).n_frames == 3 and open_image(animation).getpixel((5, 5)) == (0, 0, 255)
    turned = open_image(exif_rotated())  # stored 64x32 with its red block top-left; shown 32x64 with it top-right
    assert turned.size == (32, 64)
    assert _near(turned.getpixel((27, 4)), (255, 0, 0)) and _near(turned.getpixel((4, 4)), (0, 0, 0))
    assert all(im.mode == "RGB" for im in (gif, grey, pal, turned))


def _near(pixel, want, tol=24) -> bool:
    return all(abs(p - w) <= tol for p, w in zip(pixel, want))


def test_extreme_images_never_resize_to_zero():
    """With the limits lifted, a 1-pixel image and an 8000x2 strip still encode: no side is ever zero."""
    for size in ((1, 1), (8000, 2), (2, 8000)):
        img = open_image(encode(Image.new("RGB", size, (9, 9, 9)), "PNG"), min_side=1, max_aspect_ratio=None)
        out = Image.open(io.BytesIO(encode_jpeg(img, 512, 90)))
        assert min(out.size) >= 1 and max(out.size) == (512 if max(size) > 512 else max(out.size)) <= 512


def test_only_upright_rgb_jpegs_go_to_the_gpu_decoder():
    """nvJPEG ignores EXIF orientation and decodes only JPEG: those images take open_image instead."""
    cmyk = encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG")
    assert plain_jpeg(photo()) and not plain_jpeg(exif_rotated()) and not plain_jpeg(gif_named_jpg()) and not plain_jpeg(cmyk)
    assert open_image(cmyk).getpixel((5, 5)) == (255, 0, 0)


# --- a hostile shard through ingest ---------------------------------------------------------------


def catalog_rows(folder: Path) -> dict[str, dict]:
    """Catalog rows by id without the shard prefix ("key", or "key#2" for a repeated key)."""
    return {r["id"].split("/", 1)[1]: r for s in catalog.shards(folder) for r in catalog.read(folder, s, ok_only=False).to_pylist()}


def test_every_hostile_sample_gets_its_verdict(tmp_path):
    tar = write_hostile_tar(tmp_path / "hostile.tar")
    stage = IngestStage(IngestSettings(corpus=CorpusSettings(paths=[str(tar)])), {}, tmp_path / "catalog")
    stage.check()
    (unit,) = stage.plan()[0]
    stats = stage.process(unit)
    rows = catalog_rows(tmp_path / "catalog")
    assert {k: r["error"] for k, r in rows.items()} == EXPECTED
    assert {k: (r["width"], r["height"]) for k, r in rows.items() if r["status"] == "ok"} == ACCEPTED_SIZES
    assert stats.input == len(EXPECTED) == stats.output + sum(stats.rejected.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["catalog", "hostile.tar"]
    for r in rows.values():  # accepted rows read back exactly the image bytes that were checked
        if r["status"] == "ok":
            open_image(catalog.read_image_bytes(catalog.ImageRef(r["id"], r["path"], r["offset"], r["size"])))


def test_every_stage_opens_an_accepted_image_as_ingest_saw_it(tmp_path):
    """embed, annotate and write open the hostile shard's accepted images with ingest's function: same
    orientation (the EXIF-rotated image stays portrait), RGB, never a failure."""
    tar = write_hostile_tar(tmp_path / "hostile.tar")
    stage = IngestStage(IngestSettings(corpus=CorpusSettings(paths=[str(tar)])), {}, tmp_path / "catalog")
    for unit in stage.plan()[0]:
        stage.process(unit)
    annotate = AnnotateStage(AnnotateSettings(), {}, tmp_path / "annotations")
    write = WriteStage(WriteSettings(), {}, tmp_path / "triplets")
    for key, (w, h) in ACCEPTED_SIZES.items():
        row = catalog_rows(tmp_path / "catalog")[key]
        pixels, error = decode_pil(catalog.read_image_bytes(catalog.ImageRef(row["id"], row["path"], row["offset"], row["size"])))
        assert error is None and tuple(pixels.shape) == (3, h, w), key
        shown = annotate._image(row)
        written = Image.open(io.BytesIO(write._jpeg(row)))
        for img in (shown, written):
            assert img.mode == "RGB" and (img.width >= img.height) == (w >= h), key


def test_caption_and_member_limits_are_settings(tmp_path):
    tar = write_hostile_tar(tmp_path / "hostile.tar")
    settings = IngestSettings(corpus=CorpusSettings(paths=[str(tar)]), max_caption_bytes=4 << 20, max_json_bytes=4 << 20, min_side=1,
                              max_aspect_ratio=None)  # fmt: skip
    stage = IngestStage(settings, {}, tmp_path / "catalog")
    for unit in stage.plan()[0]:
        stage.process(unit)
    rows = catalog_rows(tmp_path / "catalog")
    assert {k: rows[k]["status"] for k in ("hugetxt", "hugecaption", "hugejson", "onepixel", "strip")} == dict.fromkeys(
        ("hugetxt", "hugecaption", "hugejson", "onepixel", "strip"), "ok"
    )
    assert rows["hugetxt"]["caption"].startswith("word word") and (rows["strip"]["width"], rows["strip"]["height"]) == (8000, 2)


# --- the pipeline over a hostile shard mixed into a small corpus --------------------------------


def test_pipeline_runs_through_a_hostile_shard(image_models, corpus, tmp_path, monkeypatch, caplog):
    """ingest and embed over the hostile shard and one ordinary shard, with one transient read error
    injected in embed: every hostile sample has its verdict, every accepted image its vectors, the
    rotated image among them after a retry, and nothing is written outside the run folder."""
    shards = tmp_path / "corpus"
    shards.mkdir()
    tar = write_hostile_tar(shards / "hostile.tar")
    shutil.copy(corpus / "00000.tar", shards / "00000.tar")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # a relative "../escape.jpg" written anywhere would land beside the run
    out = tmp_path / "run"
    # the test pipeline's embed section (conftest.pipeline_config), without the text models ingest and embed never load
    spaces = {name: {"kind": "text" if name == "caption" else "image", "model": str(path)} for name, path in image_models.items()}
    embed = {"spaces": spaces, "batch_size": 25, "device": "cpu"}
    cfg = load_config(None, patch={"embed": embed, "executor": {"kind": "local"}}, corpus=[str(shards / "*.tar")])

    runner.run(cfg, out, only="ingest", progress=False)
    rows = catalog_rows(out / "catalog")
    hostile = {k: r for k, r in rows.items() if r["shard"] == "hostile"}
    assert {k: r["error"] for k, r in hostile.items()} == EXPECTED

    rotated = hostile["rotated"]
    real_pread, failed = os.pread, []

    def flaky_pread(fd, size, offset):  # the disk fails once under the rotated image, as EIO on a shared filesystem does
        if offset == rotated["offset"] and size == rotated["size"] and not failed:
            failed.append(offset)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_pread(fd, size, offset)

    runner.run(cfg, out, only="caption", progress=False)  # the caption table embed reads: the corpus's own captions
    monkeypatch.setattr(os, "pread", flaky_pread)
    with caplog.at_level(logging.WARNING, logger="megasynth"):
        summary = runner.run(cfg, out, only="embed", progress=False)
    assert failed and "retrying (1 of" in caplog.text
    embed = summary["embed"]
    assert embed["done"] and not embed["rejected"]
    accepted = {r["id"] for r in rows.values() if r["status"] == "ok"}
    assert embed["input"] == embed["output"] == len(accepted) == 50 + len(ACCEPTED_SIZES)
    for space in ("semantic", "pattern"):
        ids = set(embeddings.load(out / "embeddings", space, "hostile")[0].tolist())
        assert ids == {f"hostile/{k}" for k in ACCEPTED_SIZES}, space

    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "cwd", "run"]
    assert list(cwd.iterdir()) == [] and sorted(p.name for p in shards.iterdir()) == ["00000.tar", "hostile.tar"]
    assert not Path("/abs").exists() and tar.stat().st_size > 0
    assert all(str(p.resolve()).startswith(str(out)) for p in out.rglob("*"))
