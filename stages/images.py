"""The one way every stage opens an image: bytes in, an RGB image as a viewer shows it out, or a reason.

ingest, embed, annotate and write all call `open_image`, so an image that ingest accepted opens the
same way everywhere, and an image ingest would reject never reaches a model. The rules:

- only the formats in `FORMATS` are tried (PIL's `formats=`): a PostScript/EPS file named `.jpg` is
  refused, never handed to Ghostscript; a GIF named `.jpg` opens as the GIF it is;
- the size is checked from the header before any pixel is decoded (`max_pixels`, `min_side`,
  `max_aspect_ratio`), so a decompression bomb costs nothing and no stage resizes to zero;
- EXIF orientation is applied; an animation gives its first frame;
- 16-bit images are scaled to 8 bits (not clipped to white); transparency (RGBA, LA, palettes and
  greyscale with a transparent colour) is composited on `BACKGROUND`.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Raster formats a crawled corpus holds. MPO (multi-picture camera JPEGs) opens through the JPEG plugin.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
BACKGROUND = (255, 255, 255)

# We bound pixels ourselves (max_pixels) from the header, with a recorded reason; PIL's own limit would
# refuse images a user's max_pixels allows.
Image.MAX_IMAGE_PIXELS = None


class ImageRejected(OSError):
    """An image that cannot be used, with a short `reason` for the catalog (e.g. "too_small").

    An OSError like PIL's UnidentifiedImageError, so handlers of unreadable images take it; it has no
    errno, so it is never mistaken for a transient I/O error.
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def open_image(data: bytes, *, max_pixels: int | None = None, min_side: int = 1, max_aspect_ratio: float | None = None) -> Image.Image:
    """Decode `data` into a loaded RGB image, or raise ImageRejected with the reason.

    Reasons: empty_image, format_not_allowed, not_an_image, too_many_pixels, too_small, too_elongated,
    truncated_image, decode_error. The bytes are in memory: nothing here can be a transient I/O error.
    """
    if not data:
        raise ImageRejected("empty_image")
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        other = recognised_format(data)
        raise ImageRejected("format_not_allowed", other) if other else ImageRejected("not_an_image") from None
    except Exception as e:  # any parser error on hostile bytes is this sample's rejection, never the run's end
        raise _failed(e) from None
    w, h = img.size
    if max_pixels is not None and w * h > max_pixels:
        raise ImageRejected("too_many_pixels", f"{w}x{h}")
    if min(w, h) < max(1, min_side):
        raise ImageRejected("too_small", f"{w}x{h}")
    if max_aspect_ratio is not None and max(w, h) > max_aspect_ratio * min(w, h):
        raise ImageRejected("too_elongated", f"{w}x{h}")
    try:
        img.load()  # an animation's first frame
        ImageOps.exif_transpose(img, in_place=True)
        return to_rgb(img)
    except Exception as e:  # as above: truncated streams, corrupt EXIF, modes PIL cannot convert
        raise _failed(e) from None


def _failed(e: Exception) -> ImageRejected:
    reason = "truncated_image" if "truncated" in str(e).lower() else "decode_error"
    return ImageRejected(reason, f"{type(e).__name__}: {e}")


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB: deep images scaled down, transparent pixels composited on BACKGROUND."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        img = Image.fromarray(_to_8bit(np.asarray(img), img.mode.startswith("I;16"), img.mode == "F"), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", img.size, (*BACKGROUND, 255)), rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _to_8bit(a: np.ndarray, sixteen_bit: bool, unit_float: bool) -> np.ndarray:
    """Greyscale samples wider than a byte -> uint8: 16-bit by its range; 32-bit int or float by the smallest
    of 1 (floats), 255, 65535 or its peak that holds its values."""
    a = np.nan_to_num(a.astype(np.float64))
    peak = float(a.max()) if a.size else 0.0
    ranges = [65535.0] if sixteen_bit else [*([1.0] if unit_float else []), 255.0, 65535.0]
    top = next((r for r in ranges if peak <= r), peak)
    return np.clip(a * (255.0 / top), 0, 255).round().astype(np.uint8)


def recognised_format(data: bytes) -> str | None:
    """The name of a PIL format outside FORMATS whose signature `data` has (e.g. "EPS"); reads 16 bytes, runs nothing."""
    Image.init()
    prefix = data[:16]
    for name, (_, accept) in Image.OPEN.items():
        if name in FORMATS or accept is None:
            continue
        try:
            if accept(prefix):
                return name
        except Exception:  # a plugin's signature test that chokes on short input says nothing
            continue
    return None


def plain_jpeg(data: bytes) -> bool:
    """Whether a GPU JPEG decoder's RGB output equals `open_image`'s: a JPEG in RGB or greyscale, upright
    (no EXIF rotation), of one frame. Reads the header only."""
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as img:
            return img.format == "JPEG" and img.mode in ("RGB", "L") and img.getexif().get(0x0112, 1) == 1
    except Exception:  # not a JPEG PIL can parse: open_image decides what it is
        return False
