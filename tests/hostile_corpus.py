"""A hostile WebDataset shard: every kind of bad sample issue 8 names, each with the verdict ingest owes it.

`write_hostile_tar(path)` writes the shard; `EXPECTED` maps each catalog key (as `rows()` in the tests
reads it: the key, "key#2" for a repeat) to the rejection reason, or None where the sample must be
accepted. `ACCEPTED_SIZES` gives the (width, height) an accepted image must have once opened.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\nnewpath 0 0 moveto 32 32 lineto stroke\nshowpage\n%%EOF\n"
BAD_NAME = b"bad\xffname".decode("utf-8", "surrogateescape")  # how tarfile reads a member name that is not UTF-8


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def photo(size=(64, 48), colour=(200, 30, 30)) -> bytes:
    return encode(Image.new("RGB", size, colour), "JPEG", quality=90)


def grey16() -> bytes:
    """A 16-bit greyscale PNG at 3/4 of full scale: opened right it is grey (191), clipped it would be white."""
    return encode(Image.fromarray(np.full((40, 48), 49151, np.uint16)), "PNG")


def palette_with_transparency() -> bytes:
    """A palette PNG whose left half is the transparent index (red underneath) and right half blue."""
    img = Image.new("P", (48, 40), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.paste(1, (24, 0, 48, 40))
    return encode(img, "PNG", transparency=0)


def rgba() -> bytes:
    """Red, fully transparent: composited on white it is white, with its alpha dropped it would be red."""
    return encode(Image.new("RGBA", (48, 40), (255, 0, 0, 0)), "PNG")


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (48, 40), c) for c in ((0, 0, 255), (0, 255, 0), (255, 0, 0))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def exif_rotated() -> bytes:
    """Stored 64x32 with EXIF orientation 6 (shown turned 90 degrees clockwise, 32x64); a red block stored top-left."""
    img = Image.new("RGB", (64, 32), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 16, 16))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def gif_named_jpg() -> bytes:
    return encode(Image.new("RGB", (40, 40), (0, 128, 0)), "GIF")


def deep_json(depth: int = 100_000) -> bytes:
    return ('{"caption": "deep", "x": ' + "[" * depth + "]" * depth + "}").encode()


def meta(caption, **kw) -> bytes:
    return json.dumps({"caption": caption, **kw}).encode()


def _regular(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info, b""


def members() -> list[tuple[tarfile.TarInfo, bytes]]:
    good = photo()
    return [
        _regular("ok.jpg", good), _regular("ok.json", meta("a red photo")),
        # captions
        _regular("surrogate.jpg", photo(colour=(1, 2, 3))), _regular("surrogate.json", b'{"caption": "half an emoji \\ud83d"}'),
        _regular("deep.jpg", photo(colour=(2, 3, 4))), _regular("deep.json", deep_json()),
        _regular("notobject.jpg", photo(colour=(3, 4, 5))), _regular("notobject.json", b'["a", "list"]'),
        _regular("captionint.jpg", photo(colour=(4, 5, 6))), _regular("captionint.json", meta(42)),
        _regular("captionlist.jpg", photo(colour=(5, 6, 7))), _regular("captionlist.json", meta(["a", "b"])),
        _regular("badtxt.jpg", photo(colour=(6, 7, 8))), _regular("badtxt.txt", b"caf\xe9 au lait \xff"),
        _regular(f"{BAD_NAME}.jpg", photo(colour=(7, 8, 9))),
        _regular("hugetxt.jpg", photo(colour=(8, 9, 10))), _regular("hugetxt.txt", b"word " * 400_000),
        _regular("hugecaption.jpg", photo(colour=(9, 10, 11))), _regular("hugecaption.json", meta("long " * 40_000)),
        _regular("hugejson.jpg", photo(colour=(10, 11, 12))), _regular("hugejson.json", meta("x", blob="y" * 3_000_000)),
        # members that are not regular files, and names that point outside
        _special("somedir", tarfile.DIRTYPE),
        _special("link.jpg", tarfile.SYMTYPE, "/etc/passwd"), _regular("link.json", meta("a symlink")),
        _special("hard.jpg", tarfile.LNKTYPE, "ok.jpg"),
        _special("chardev.jpg", tarfile.CHRTYPE),
        _special("blockdev.jpg", tarfile.BLKTYPE),
        _special("fifo.jpg", tarfile.FIFOTYPE),
        _regular("../escape.jpg", photo(colour=(11, 12, 13))), _regular("../escape.json", meta("up and out")),
        _regular("/abs/olute.jpg", photo(colour=(12, 13, 14))),
        # image contents
        _regular("eps.jpg", EPS), _regular("eps.json", meta("PostScript named .jpg")),
        _regular("gif.jpg", gif_named_jpg()), _regular("gif.json", meta("a GIF named .jpg")),
        _regular("grey16.png", grey16()), _regular("grey16.json", meta("16-bit grey")),
        _regular("palette.png", palette_with_transparency()), _regular("palette.json", meta("palette with transparency")),
        _regular("rgba.png", rgba()), _regular("rgba.json", meta("transparent red")),
        _regular("animated.gif", animated_gif()), _regular("animated.json", meta("an animation")),
        _regular("rotated.jpg", exif_rotated()), _regular("rotated.json", meta("turned by EXIF")),
        _regular("onepixel.png", encode(Image.new("RGB", (1, 1)), "PNG")),
        _regular("strip.png", encode(Image.new("RGB", (8000, 2), (9, 9, 9)), "PNG")),
        # the same key twice in a row, and again later
        _regular("twice.jpg", photo(colour=(13, 14, 15))), _regular("twice.jpg", photo(colour=(14, 15, 16))),
        _regular("ok.jpg", good),
    ]  # fmt: skip


EXPECTED: dict[str, str | None] = {
    "ok": None,
    "surrogate": "caption_not_unicode",
    "deep": "json_too_deep",
    "notobject": "json_not_object",
    "captionint": "caption_not_text",
    "captionlist": "caption_not_text",
    "badtxt": "caption_not_utf8",
    "bad\\xffname": "member_name_not_utf8",
    "hugetxt": "caption_too_long",
    "hugecaption": "caption_too_long",
    "hugejson": "json_too_large",
    "link": "member_is_symlink",
    "hard": "member_is_hardlink",
    "chardev": "member_is_device",
    "blockdev": "member_is_device",
    "fifo": "member_is_fifo",
    "../escape": "unsafe_member_name",
    "/abs/olute": "unsafe_member_name",
    "eps": "format_not_allowed",
    "gif": None,
    "grey16": None,
    "palette": None,
    "rgba": None,
    "animated": None,
    "rotated": None,
    "onepixel": "too_small",
    "strip": "too_small",
    "twice": None,
    "twice#2": "duplicate_key",
    "ok#2": "duplicate_key",
}

ACCEPTED_SIZES = {"ok": (64, 48), "gif": (40, 40), "grey16": (48, 40), "palette": (48, 40), "rgba": (48, 40),
                  "animated": (48, 40), "rotated": (32, 64), "twice": (64, 48)}  # fmt: skip


def write_hostile_tar(path: Path) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members():
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return path
