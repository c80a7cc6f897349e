"""A deterministic, Recap-DataComp-like synthetic corpus in img2dataset's WebDataset layout.

Rendered scenes (a background, 1-4 groups of shapes or real photo cut-outs from scikit-image's
bundled images, a layout, a lighting) are grouped in families: a base scene plus variants that
change one or two attributes. Near-duplicates, exact duplicates, captionless samples and
singletons are mixed in, and the order is shuffled across shards. Every sample's json carries
the scene's ground truth under `attributes`.
"""

from __future__ import annotations

import io
import json
import math
import sys
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from stages.base import write_bytes_atomic

JPEG_QUALITY = 90
TAR_MTIME = 1_700_000_000  # fixed so that the tar bytes never depend on the clock
KEY_DIGITS_PER_SHARD = 4  # img2dataset: key = shard * 10**4 + index, 9 digits with 5 for the shard

EXACT_DUPLICATE_RATE = 0.01
NEAR_DUPLICATE_RATE = 0.05
CAPTIONLESS_RATE = 0.02

# Independent random streams, so that changing one part of the plan leaves the others alone.
STREAM_PLAN, STREAM_CAPTION, STREAM_URL, STREAM_COPY, STREAM_ORDER = 1, 2, 3, 4, 5

# ---------------------------------------------------------------- vocabulary

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "orange": (245, 135, 25),
    "yellow": (245, 210, 40),
    "green": (44, 160, 60),
    "blue": (31, 90, 220),
    "purple": (135, 60, 185),
    "pink": (240, 120, 175),
    "brown": (125, 75, 35),
    "black": (22, 22, 22),
    "white": (245, 245, 242),
    "gray": (128, 128, 128),
    "teal": (20, 150, 150),
    "navy": (25, 35, 100),
    "beige": (225, 205, 165),
}
OBJECT_COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "teal")

SHAPES = ("circle", "square", "triangle", "star", "ring", "diamond", "hexagon", "cross", "heart")
PHOTOS = ("cat", "coffee", "astronaut", "rocket", "motorcycle", "photographer", "shuttle", "coin")
SILHOUETTES = ("horse",)

# (singular, plural) nouns; every one contains its kind's name so captions are checkable.
SHORT_NOUNS: dict[str, tuple[str, str]] = {
    **{s: (s, s + ("es" if s.endswith("s") else "s")) for s in SHAPES},
    "cat": ("cat", "cats"),
    "coffee": ("cup of coffee", "cups of coffee"),
    "astronaut": ("astronaut", "astronauts"),
    "rocket": ("rocket", "rockets"),
    "motorcycle": ("motorcycle", "motorcycles"),
    "photographer": ("photographer", "photographers"),
    "shuttle": ("space shuttle", "space shuttles"),
    "coin": ("old coin", "old coins"),
    "horse": ("horse silhouette", "horse silhouettes"),
}
LONG_PHOTO_NOUNS: dict[str, tuple[str, str]] = {
    "cat": ("a close-up photo of a tabby cat's face", "{n} identical photos of a tabby cat's face"),
    "coffee": ("a cup of coffee on a red saucer", "{n} cups of coffee on red saucers"),
    "astronaut": ("a smiling astronaut in an orange spacesuit", "{n} smiling astronauts in orange spacesuits"),
    "rocket": ("a white rocket standing on its launch pad at dusk", "{n} white rockets on launch pads at dusk"),
    "motorcycle": ("a red motorcycle", "{n} red motorcycles"),
    "photographer": ("a black-and-white photo of a photographer behind a camera on a tripod",
                     "{n} black-and-white photos of a photographer behind a camera"),
    "shuttle": ("a model of the space shuttle", "{n} models of the space shuttle"),
    "coin": ("an ancient silver coin", "{n} ancient silver coins"),
}
NUMBER_WORDS = dict(enumerate("zero one two three four five six seven eight nine ten eleven twelve".split()))

TEXTURES = ("brick", "grass", "gravel", "moon", "hubble", "page")
TEXTURE_SHORT = {
    "brick": "a brick wall", "grass": "grass", "gravel": "gravel", "moon": "the surface of the moon",
    "hubble": "a starry night sky", "page": "a page of printed text",
}
TEXTURE_LONG = {
    "brick": "a wall of dark red bricks with pale mortar lines",
    "grass": "a patch of green grass and small leaves seen from above",
    "gravel": "a bed of gray gravel stones",
    "moon": "the cratered gray surface of the moon",
    "hubble": "a dark night sky full of stars and distant galaxies",
    "page": "a printed page of black text on white paper",
}
BACKGROUND_KINDS = ("solid", "gradient", "stripes", "checks", "texture")
BACKGROUND_WEIGHTS = (0.25, 0.2, 0.12, 0.08, 0.35)

LAYOUTS = ("left", "right", "centre", "row", "grid", "scattered")
LIGHTINGS = ("neutral", "bright", "dim", "warm", "cool", "backlit")
LIGHTING_WEIGHTS = (0.5, 0.1, 0.1, 0.1, 0.1, 0.1)
EFFECTS = ("none", "blur", "noise")
EFFECT_WEIGHTS = (0.8, 0.1, 0.1)
VARIATIONS = ("object_colour", "object_kind", "object_count", "background", "lighting", "layout")
NEAR_DUPLICATE_TRANSFORMS = ("jitter", "reencode", "crop", "resize")

FAMILY_SIZES = (1, 2, 3, 4, 5, 6, 7, 8)
FAMILY_SIZE_WEIGHTS = (0.3, 0.16, 0.14, 0.12, 0.1, 0.08, 0.05, 0.05)

URL_HOSTS = ("images.example.com", "cdn.example.org", "static.example.net", "www.example.com", "media.example.org")
URL_DIRS = ("uploads", "photos", "media/images", "wp-content/uploads", "assets/img", "i")

# ---------------------------------------------------------------- scene model


@dataclass(frozen=True)
class ObjectGroup:
    kind: str
    colour: str | None  # None for photo cut-outs, which keep their own colours
    count: int

    @property
    def category(self) -> str:
        return "shape" if self.kind in SHAPES else "photo" if self.kind in PHOTOS else "silhouette"


@dataclass(frozen=True)
class Background:
    kind: str
    colours: tuple[str, ...] = ()
    texture: str | None = None
    direction: str | None = None
    window: tuple[float, float, float] = (0.0, 0.0, 1.0)  # texture crop: x, y, scale (render detail)
    period: float = 0.15  # stripe/check period as a fraction of the short side (render detail)

    @property
    def described(self) -> tuple:
        return self.kind, self.colours, self.texture, self.direction


@dataclass(frozen=True)
class Scene:
    family: str
    variant: str
    width: int
    height: int
    background: Background
    objects: tuple[ObjectGroup, ...]
    layout: str
    lighting: str
    effect: str
    seed: int  # positions, rotations and noise; shared by a family so variants differ only as planned

    @property
    def described(self) -> tuple:
        """What the attributes record; two scenes of a family must differ here, not only in render details."""
        return self.background.described, self.objects, self.layout, self.lighting, self.effect

    @property
    def style(self) -> str:
        if any(o.category == "photo" for o in self.objects):
            return "collage"
        return "composite" if self.background.kind == "texture" else "illustration"


@dataclass
class Sample:
    scene: Scene
    copy_kind: str | None = None  # None, "near_duplicate" or "exact_duplicate"
    source: Sample | None = None
    transform: str | None = None
    copy_seed: int = 0
    caption: str = ""
    re_caption: str = ""
    url: str = ""
    key: str = ""


def attributes_of(sample: Sample) -> dict:
    s = sample.scene
    bg = s.background
    copy = None
    if sample.copy_kind is not None:
        copy = {"kind": sample.copy_kind, "of": sample.source.key, "transform": sample.transform}
    return {
        "family": s.family,
        "variant": s.variant,
        "copy": copy,
        "background": {"kind": bg.kind, "colours": list(bg.colours), "texture": bg.texture, "direction": bg.direction},
        "objects": [{"kind": o.kind, "category": o.category, "colour": o.colour, "count": o.count} for o in s.objects],
        "layout": s.layout,
        "lighting": s.lighting,
        "effect": s.effect,
        "style": s.style,
    }


# ---------------------------------------------------------------- planning


def _pick(rng: np.random.Generator, options, weights=None):
    if weights is None:
        return options[int(rng.integers(len(options)))]
    p = np.asarray(weights, dtype=float)
    return options[int(rng.choice(len(options), p=p / p.sum()))]


def _colour_distance(a: str, b: str) -> float:
    return float(np.linalg.norm(np.subtract(COLOURS[a], COLOURS[b])))


def _background_rgbs(bg: Background) -> list[tuple[int, int, int]]:
    if bg.kind == "texture":
        return [texture_mean_rgb(bg.texture)]
    return [COLOURS[c] for c in bg.colours]


def _contrasts(colour: str | None, bg: Background) -> bool:
    if colour is None:
        return True
    return all(np.linalg.norm(np.subtract(COLOURS[colour], rgb)) > 110 for rgb in _background_rgbs(bg))


def random_background(rng: np.random.Generator) -> Background:
    kind = _pick(rng, BACKGROUND_KINDS, BACKGROUND_WEIGHTS)
    if kind == "texture":
        window = (float(rng.random()), float(rng.random()), float(rng.uniform(0.45, 1.0)))
        return Background("texture", texture=_pick(rng, TEXTURES), window=window)
    first = _pick(rng, tuple(COLOURS))
    if kind == "solid":
        return Background("solid", (first,))
    second = _pick(rng, tuple(c for c in COLOURS if _colour_distance(c, first) > 120))
    directions = ("vertical", "horizontal") if kind == "gradient" else ("vertical", "horizontal", "diagonal")
    direction = None if kind == "checks" else _pick(rng, directions)
    return Background(kind, (first, second), direction=direction, period=float(rng.uniform(0.1, 0.25)))


def random_group(rng: np.random.Generator, bg: Background, taken: list[ObjectGroup]) -> ObjectGroup:
    for _ in range(100):
        category = _pick(rng, ("shape", "photo", "silhouette"), (0.55, 0.35, 0.1))
        kinds = {"shape": SHAPES, "photo": PHOTOS, "silhouette": SILHOUETTES}[category]
        kind = _pick(rng, kinds)
        colour = None if category == "photo" else _pick(rng, OBJECT_COLOURS)
        count = int(_pick(rng, (1, 2, 3), (0.55, 0.3, 0.15)))
        group = ObjectGroup(kind, colour, count)
        if _contrasts(colour, bg) and _group_fits(group, taken):
            return group
    raise RuntimeError("could not draw a distinct object group")  # unreachable with this vocabulary


def _group_fits(group: ObjectGroup, taken: list[ObjectGroup] | tuple[ObjectGroup, ...]) -> bool:
    # One group per kind keeps captions unambiguous ("two red circles", never "... and a red circle").
    return all(group.kind != other.kind for other in taken)


def random_scene(rng: np.random.Generator, family: str, size: tuple[int, int]) -> Scene:
    width, height = (int(round(d * rng.uniform(0.8, 1.2) / 2)) * 2 for d in size)
    bg = random_background(rng)
    groups: list[ObjectGroup] = []
    for _ in range(int(_pick(rng, (1, 2, 3, 4), (0.4, 0.3, 0.2, 0.1)))):
        groups.append(random_group(rng, bg, groups))
    return Scene(
        family=family, variant="base", width=width, height=height, background=bg, objects=tuple(groups),
        layout=_pick(rng, LAYOUTS), lighting=_pick(rng, LIGHTINGS, LIGHTING_WEIGHTS),
        effect=_pick(rng, EFFECTS, EFFECT_WEIGHTS), seed=int(rng.integers(2**31)),
    )


def _vary_objects(rng: np.random.Generator, scene: Scene, change: str) -> tuple[ObjectGroup, ...] | None:
    groups = list(scene.objects)
    candidates = [i for i, g in enumerate(groups) if change != "object_colour" or g.colour is not None]
    if not candidates:
        return None
    i = candidates[int(rng.integers(len(candidates)))]
    old, others = groups[i], groups[:i] + groups[i + 1:]
    for _ in range(50):
        if change == "object_colour":
            new = replace(old, colour=_pick(rng, OBJECT_COLOURS))
        elif change == "object_count":
            new = replace(old, count=int(_pick(rng, (1, 2, 3))))
        else:
            kinds = {"shape": SHAPES, "photo": PHOTOS, "silhouette": SHAPES}[old.category]
            kind = _pick(rng, kinds)
            new = replace(old, kind=kind, colour=old.colour if kind not in PHOTOS else None)
        if new != old and _contrasts(new.colour, scene.background) and _group_fits(new, others):
            groups[i] = new
            return tuple(groups)
    return None


def _apply_change(rng: np.random.Generator, scene: Scene, change: str) -> Scene | None:
    if change.startswith("object_"):
        objects = _vary_objects(rng, scene, change)
        return None if objects is None else replace(scene, objects=objects)
    if change == "background":
        for _ in range(50):
            bg = random_background(rng)
            if bg.described != scene.background.described and all(_contrasts(o.colour, bg) for o in scene.objects):
                return replace(scene, background=bg)
        return None
    if change == "lighting":
        return replace(scene, lighting=_pick(rng, tuple(x for x in LIGHTINGS if x != scene.lighting)))
    return replace(scene, layout=_pick(rng, tuple(x for x in LAYOUTS if x != scene.layout)))


def make_variant(rng: np.random.Generator, base: Scene) -> Scene:
    while True:
        n_changes = 1 if rng.random() < 0.7 else 2
        changes = sorted(rng.choice(len(VARIATIONS), size=n_changes, replace=False).tolist())
        scene = base
        for c in changes:
            scene = _apply_change(rng, scene, VARIATIONS[c]) if scene is not None else None
        if scene is not None and scene.described != base.described:
            return replace(scene, variant="+".join(VARIATIONS[c] for c in changes))


def plan_families(rng: np.random.Generator, n_scenes: int, size: tuple[int, int]) -> list[Scene]:
    scenes: list[Scene] = []
    families = 0
    while len(scenes) < n_scenes:
        family, families = f"f{families:05d}", families + 1
        members = min(int(_pick(rng, FAMILY_SIZES, FAMILY_SIZE_WEIGHTS)), n_scenes - len(scenes))
        base = random_scene(rng, family, size)
        scenes.append(base)
        seen = {base.described}
        for _ in range(20 * (members - 1)):  # a variant that repeats a sibling would be an unlabelled duplicate
            if len(seen) == members:
                break
            variant = make_variant(rng, base)
            if variant.described not in seen:
                seen.add(variant.described)
                scenes.append(variant)
    return scenes


def _stream(seed: int, stream: int, index: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, stream, index])


def plan_corpus(images: int, seed: int, image_size: tuple[int, int], shard_size: int) -> list[Sample]:
    n_exact = int(round(images * EXACT_DUPLICATE_RATE))
    n_near = int(round(images * NEAR_DUPLICATE_RATE))
    n_scenes = images - n_exact - n_near
    originals = [Sample(scene) for scene in plan_families(_stream(seed, STREAM_PLAN), n_scenes, image_size)]

    copy_rng = _stream(seed, STREAM_COPY)
    copies = []
    for i in range(n_near + n_exact):
        source = originals[int(copy_rng.integers(len(originals)))]
        if i < n_near:
            copies.append(Sample(source.scene, "near_duplicate", source, _pick(copy_rng, NEAR_DUPLICATE_TRANSFORMS),
                                 int(copy_rng.integers(2**31))))
        else:
            copies.append(Sample(source.scene, "exact_duplicate", source))

    n_captionless = min(len(originals), int(round(images * CAPTIONLESS_RATE)))
    captionless = set(copy_rng.choice(len(originals), size=n_captionless, replace=False).tolist())
    for i, sample in enumerate(originals):
        if i not in captionless:
            sample.caption, sample.re_caption = write_captions(sample.scene, _stream(seed, STREAM_CAPTION, i))
    for sample in copies:
        sample.caption, sample.re_caption = sample.source.caption, sample.source.re_caption

    samples = originals + copies
    order = _stream(seed, STREAM_ORDER).permutation(len(samples))
    samples = [samples[i] for i in order]
    for position, sample in enumerate(samples):
        shard, index = divmod(position, shard_size)
        sample.key = f"{shard:05d}{index:0{KEY_DIGITS_PER_SHARD}d}"
        sample.url = make_url(sample, _stream(seed, STREAM_URL, position))
    return samples


def make_url(sample: Sample, rng: np.random.Generator) -> str:
    words = [w.strip(",.'").lower() for w in sample.caption.split()][:8]
    slug = "-".join(w for w in words if w.isalnum()) or f"IMG_{int(rng.integers(1000, 99999))}"
    host, folder = _pick(rng, URL_HOSTS), _pick(rng, URL_DIRS)
    token = "".join(_pick(rng, tuple("0123456789abcdef")) for _ in range(8))
    year, month = int(rng.integers(2012, 2024)), int(rng.integers(1, 13))
    ext = _pick(rng, (".jpg", ".jpg", ".jpeg", ".JPG"))
    return f"https://{host}/{folder}/{year}/{month:02d}/{slug}-{token}{ext}"


# ---------------------------------------------------------------- captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _count_word(n: int, noun: str, digits: bool) -> str:
    if n == 1:
        return _article(noun)
    return str(n) if digits else NUMBER_WORDS[n]


def short_group_phrase(g: ObjectGroup, digits: bool) -> str:
    noun = SHORT_NOUNS[g.kind][0 if g.count == 1 else 1]
    words = f"{g.colour} {noun}" if g.colour else noun
    return f"{_count_word(g.count, words, digits)} {words}"


def long_group_phrase(g: ObjectGroup) -> str:
    if g.category == "photo":
        single, plural = LONG_PHOTO_NOUNS[g.kind]
        return single if g.count == 1 else plural.format(n=NUMBER_WORDS[g.count])
    words = f"{g.colour} {SHORT_NOUNS[g.kind][0 if g.count == 1 else 1]}"
    return f"{_count_word(g.count, words, digits=False)} {words}"


def join_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def short_background(bg: Background) -> str:
    if bg.kind == "texture":
        return TEXTURE_SHORT[bg.texture]
    if bg.kind == "solid":
        return f"{_article(bg.colours[0])} {bg.colours[0]} background"
    a, b = bg.colours
    return {"gradient": f"{_article(a)} {a} to {b} gradient", "stripes": f"{a} and {b} stripes",
            "checks": f"{_article(a)} {a} and {b} checkerboard"}[bg.kind]


def long_background(bg: Background, rng: np.random.Generator) -> str:
    if bg.kind == "texture":
        return TEXTURE_LONG[bg.texture]
    if bg.kind == "solid":
        return _pick(rng, (f"a plain, uniform {bg.colours[0]} backdrop", f"a solid {bg.colours[0]} color"))
    a, b = bg.colours
    if bg.kind == "gradient":
        ends = ("the top", "the bottom") if bg.direction == "vertical" else ("the left", "the right")
        return f"a smooth gradient that fades from {a} at {ends[0]} to {b} at {ends[1]}"
    if bg.kind == "stripes":
        return f"bold {bg.direction} stripes of {a} and {b}"
    return f"{_article(a)} {a} and {b} checkerboard pattern"


PLACEMENTS = {
    "left": ("grouped on the left side of the frame", "clustered toward the left edge of the picture"),
    "right": ("grouped on the right side of the frame", "clustered toward the right edge of the picture"),
    "centre": ("placed in the center of the image", "gathered in the middle of the frame"),
    "row": ("lined up in a horizontal row", "arranged side by side in a row across the middle"),
    "grid": ("arranged in a tidy grid", "laid out in a regular grid pattern"),
    "scattered": ("scattered loosely across the frame", "spread out at random positions"),
}
LIGHTING_SHORT = {"bright": "brightly lit", "dim": "dim light", "warm": "warm light", "cool": "cool light",
                  "backlit": "backlit"}
LIGHTING_SENTENCES = {
    "neutral": ("The lighting is even and neutral.", "The scene is evenly lit with natural, neutral colors."),
    "bright": ("The scene is brightly lit, with light, airy tones.", "Bright light washes over the whole picture."),
    "dim": ("The lighting is dim, so the whole image looks dark and muted.", "It is dimly lit and rather dark."),
    "warm": ("Warm, golden light gives the image an orange cast.", "The colors are warm, as if lit by a sunset."),
    "cool": ("A cool, bluish light tints the entire scene.", "The lighting is cool, with a blue tint."),
    "backlit": ("The scene is backlit: a bright glow behind the objects leaves them dark, almost in silhouette.",
                "Strong backlighting makes the objects look dark against a glowing background."),
}
EFFECT_SENTENCES = {
    "blur": ("The image is slightly blurry and out of focus.", "Everything looks a little soft and blurred."),
    "noise": ("The picture is grainy, with visible noise.", "There is noticeable grain across the image."),
}
STYLE_SENTENCES = {
    "collage": ("Overall, it looks like a digital collage of cut-out photos.",
                "The style is that of a simple photo collage."),
    "composite": ("It looks like a digital composite of flat shapes over a photographic texture.",
                  "The style mixes simple graphic shapes with a real photo background."),
    "illustration": ("Overall, it has the look of a simple, flat vector illustration.",
                     "The style is clean and graphic, like clip art."),
}


def write_short_caption(scene: Scene, rng: np.random.Generator) -> str:
    digits = rng.random() < 0.3
    objects = join_list([short_group_phrase(g, digits) for g in scene.objects])
    bg = short_background(scene.background)
    templates = [f"{objects} on {bg}", f"{objects} against {bg}", f"{objects} - {bg}"]
    if scene.style == "illustration":
        templates.append(f"illustration of {objects} on {bg}")
    if scene.style == "collage":
        templates.append(f"collage with {objects} on {bg}")
    caption = _pick(rng, templates)
    if scene.lighting != "neutral" and rng.random() < 0.5:
        caption += f", {LIGHTING_SHORT[scene.lighting]}"
    return caption[0].upper() + caption[1:] if rng.random() < 0.5 else caption


def write_re_caption(scene: Scene, rng: np.random.Generator) -> str:
    objects = join_list([long_group_phrase(g) for g in scene.objects])
    place = _pick(rng, PLACEMENTS[scene.layout])
    total = sum(g.count for g in scene.objects)
    verb = "is" if total == 1 else "are"
    opening = _pick(rng, (
        f"The image shows {objects}, {place}.",
        f"This picture features {objects} {place}.",
        f"In this image, {objects} {verb} {place}.",
        f"The scene contains {objects}, {place}.",
    ))
    background = long_background(scene.background, rng)
    setting = _pick(rng, (f"The background is {background}.", f"In the background there is {background}.",
                          f"Everything is set against {background}."))
    core = [opening, setting, _pick(rng, LIGHTING_SENTENCES[scene.lighting])]
    extras = []
    if scene.effect != "none":
        extras.append(_pick(rng, EFFECT_SENTENCES[scene.effect]))
    extras.append(_pick(rng, STYLE_SENTENCES[scene.style]))
    if total > 1:
        extras.append(f"In total there are {NUMBER_WORDS[total]} objects in the picture.")
    sentences = core + extras
    while len(" ".join(sentences).split()) > 80 and len(sentences) > 3:
        sentences.pop()  # drop the least important details first
    return " ".join(sentences)


def write_captions(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    return write_short_caption(scene, rng), write_re_caption(scene, rng)


# ---------------------------------------------------------------- source photos


@lru_cache(maxsize=None)
def _skimage_rgb(name: str) -> np.ndarray:
    import skimage.data  # imported late: only rendering needs it

    if name == "motorcycle":
        image = skimage.data.stereo_motorcycle()[0]
    else:
        image = getattr(skimage.data, name)()
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3])


# Photo cut-outs: (skimage image, crop box x0 y0 x1 y1, mask shape).
CUTOUTS = {
    "cat": ("chelsea", (20, 0, 390, 300), "ellipse"),
    "coffee": ("coffee", (70, 10, 485, 395), "ellipse"),
    "astronaut": ("astronaut", (40, 0, 370, 420), "ellipse"),
    "rocket": ("rocket", (262, 112, 378, 427), "rounded"),
    "motorcycle": ("motorcycle", (85, 75, 695, 465), "rounded"),
    "photographer": ("camera", (90, 55, 420, 512), "rounded"),
    "shuttle": ("astronaut", (350, 0, 475, 285), "rounded"),
    "coin": ("coins", (312, 150, 384, 224), "ellipse"),
}
# Grey textures get a fixed tint: (dark, light) colours that the grey levels map between.
TEXTURE_SOURCES = {
    "brick": ("brick", ((70, 22, 15), (235, 205, 185))),
    "grass": ("grass", ((12, 38, 6), (175, 225, 110))),
    "gravel": ("gravel", ((35, 33, 30), (225, 220, 210))),
    "moon": ("moon", None),
    "hubble": ("hubble_deep_field", None),
    "page": ("page", None),
}


@lru_cache(maxsize=None)
def _texture(name: str) -> Image.Image:
    source, tint = TEXTURE_SOURCES[name]
    rgb = _skimage_rgb(source)
    if tint is not None:
        grey = rgb[..., :1].astype(np.float32) / 255.0
        dark, light = np.array(tint[0], np.float32), np.array(tint[1], np.float32)
        rgb = (dark + grey * (light - dark)).round().astype(np.uint8)
    return Image.fromarray(rgb)


@lru_cache(maxsize=None)
def texture_mean_rgb(name: str) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.asarray(_texture(name)).reshape(-1, 3).mean(axis=0))


def _soft_mask(size: tuple[int, int], shape: str) -> Image.Image:
    w, h = size
    mask = Image.new("L", (w * 2, h * 2), 0)
    draw = ImageDraw.Draw(mask)
    box = (2, 2, w * 2 - 3, h * 2 - 3)
    if shape == "ellipse":
        draw.ellipse(box, fill=255)
    else:
        draw.rounded_rectangle(box, radius=min(w, h) // 4, fill=255)
    return mask.resize((w, h), Image.Resampling.BOX).filter(ImageFilter.GaussianBlur(1))


@lru_cache(maxsize=None)
def _cutout_source(kind: str) -> tuple[Image.Image, Image.Image]:
    if kind == "horse":
        horse = _skimage_rgb("horse")[..., 0] < 128  # the silhouette is the dark part
        ys, xs = np.nonzero(horse)
        crop = horse[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        mask = Image.fromarray(crop.astype(np.uint8) * 255)
        return Image.new("RGB", mask.size, (0, 0, 0)), mask
    source, box, shape = CUTOUTS[kind]
    photo = Image.fromarray(_skimage_rgb(source)).crop(box)
    return photo, _soft_mask(photo.size, shape)


@lru_cache(maxsize=4096)
def cutout(kind: str, size: int, mirrored: bool) -> tuple[Image.Image, Image.Image]:
    photo, mask = _cutout_source(kind)
    scale = size / max(photo.size)
    target = (max(1, round(photo.width * scale)), max(1, round(photo.height * scale)))
    photo = photo.resize(target, Image.Resampling.BILINEAR, reducing_gap=2.0)
    mask = mask.resize(target, Image.Resampling.BILINEAR, reducing_gap=2.0)
    if mirrored:
        photo, mask = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT), mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return photo, mask


# ---------------------------------------------------------------- shapes


def _star_points(c: float, r: float, angle: float, points: int = 5) -> list[tuple[float, float]]:
    out = []
    for i in range(points * 2):
        radius = r if i % 2 == 0 else r * 0.45
        a = angle + math.pi * i / points - math.pi / 2
        out.append((c + radius * math.cos(a), c + radius * math.sin(a)))
    return out


def _rotated(points, c: float, angle: float) -> list[tuple[float, float]]:
    cos, sin = math.cos(angle), math.sin(angle)
    return [(c + (x - c) * cos - (y - c) * sin, c + (x - c) * sin + (y - c) * cos) for x, y in points]


def _heart_points(c: float, r: float) -> list[tuple[float, float]]:
    t = np.linspace(0, 2 * np.pi, 80, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    k = r / 17.0
    return [(c + k * a, c + k * (b + 1.5)) for a, b in zip(x, y)]


@lru_cache(maxsize=4096)
def shape_mask(kind: str, size: int, angle_step: int) -> Image.Image:
    ss = size * 2  # drawn at twice the size, then reduced, for smooth edges
    c, r = ss / 2, ss / 2 - 2
    angle = math.radians(angle_step * 15)
    mask = Image.new("L", (ss, ss), 0)
    draw = ImageDraw.Draw(mask)
    if kind == "circle":
        draw.ellipse((c - r, c - r, c + r, c + r), fill=255)
    elif kind == "ring":
        draw.ellipse((c - r, c - r, c + r, c + r), fill=255)
        draw.ellipse((c - r * 0.58, c - r * 0.58, c + r * 0.58, c + r * 0.58), fill=0)
    elif kind == "square":
        s = r * 0.8
        draw.polygon(_rotated([(c - s, c - s), (c + s, c - s), (c + s, c + s), (c - s, c + s)], c, angle), fill=255)
    elif kind == "diamond":
        draw.polygon(_rotated([(c, c - r), (c + r * 0.65, c), (c, c + r), (c - r * 0.65, c)], c, angle), fill=255)
    elif kind == "triangle":
        draw.regular_polygon((c, c + r * 0.15, r), 3, rotation=angle_step * 15, fill=255)
    elif kind == "hexagon":
        draw.regular_polygon((c, c, r), 6, rotation=angle_step * 15, fill=255)
    elif kind == "star":
        draw.polygon(_star_points(c, r, angle), fill=255)
    elif kind == "cross":
        a, b = r * 0.3, r * 0.9
        arm = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a),
               (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
        draw.polygon(_rotated([(c + x, c + y) for x, y in arm], c, angle), fill=255)
    elif kind == "heart":
        draw.polygon(_heart_points(c, r), fill=255)
    return mask.reduce(2)


@lru_cache(maxsize=1024)
def _shaded_fill(colour: str, size: int) -> Image.Image:
    # A light-to-dark vertical shading makes flat shapes read as objects.
    shade = np.linspace(1.12, 0.82, size, dtype=np.float32)[:, None, None]
    rgb = np.clip(np.array(COLOURS[colour], np.float32) * shade + (shade - 1) * 40, 0, 255)
    return Image.fromarray(np.broadcast_to(rgb, (size, size, 3)).round().astype(np.uint8))


# ---------------------------------------------------------------- layout

LAYOUT_REGIONS = {  # x0, y0, x1, y1 as fractions of the frame
    "left": (0.03, 0.08, 0.42, 0.92),
    "right": (0.58, 0.08, 0.97, 0.92),
    "centre": (0.22, 0.12, 0.78, 0.88),
    "row": (0.03, 0.2, 0.97, 0.8),
    "grid": (0.05, 0.05, 0.95, 0.95),
}


def _grid_shape(n: int, w: float, h: float, layout: str) -> tuple[int, int]:
    if layout == "row":
        return n, 1
    if layout == "grid":
        cols = math.ceil(math.sqrt(n * w / h))
        return min(cols, n), math.ceil(n / min(cols, n))
    best = max(range(1, n + 1), key=lambda cols: min(w / cols, h / math.ceil(n / cols)))
    return best, math.ceil(n / best)


def slots(layout: str, n: int, width: int, height: int, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    if layout == "scattered":
        return _scattered_slots(n, width, height, rng)
    fx0, fy0, fx1, fy1 = LAYOUT_REGIONS[layout]
    x0, y0, rw, rh = fx0 * width, fy0 * height, (fx1 - fx0) * width, (fy1 - fy0) * height
    cols, rows = _grid_shape(n, rw, rh, layout)
    cell = min(rw / cols, rh / rows)
    size = int(min(cell * 0.84, 0.62 * min(width, height)))
    out = []
    for i in range(n):
        row, col = divmod(i, cols)
        in_row = min(cols, n - row * cols)  # a short last row is centred
        cx = x0 + rw / 2 + (col - (in_row - 1) / 2) * (rw / cols if layout != "row" else cell)
        cy = y0 + rh / 2 + (row - (rows - 1) / 2) * cell
        jx, jy = rng.uniform(-0.05, 0.05, size=2) * cell
        out.append((int(cx + jx), int(cy + jy), size))
    return out


def _scattered_slots(n: int, width: int, height: int, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    size = int(min(width, height) * 0.5 / math.sqrt(n) + 8)
    placed: list[tuple[int, int, int]] = []
    for _ in range(n):
        for attempt in range(100):
            cx = int(rng.uniform(size / 2, width - size / 2))
            cy = int(rng.uniform(size / 2, height - size / 2))
            spacing = size * (1.05 if attempt < 80 else 0.8)  # accept a little overlap rather than loop forever
            if all(math.hypot(cx - x, cy - y) > spacing for x, y, _ in placed):
                break
        placed.append((cx, cy, size))
    return placed


# ---------------------------------------------------------------- rendering


def _texture_crop(bg: Background, width: int, height: int) -> Image.Image:
    tex = _texture(bg.texture)
    fx, fy, scale = bg.window
    wh = scale * min(tex.height, tex.width * height / width)
    ww = wh * width / height
    x0, y0 = fx * (tex.width - ww), fy * (tex.height - wh)
    return tex.resize((width, height), Image.Resampling.BILINEAR, box=(x0, y0, x0 + ww, y0 + wh), reducing_gap=2.0)


def _pattern(bg: Background, width: int, height: int) -> np.ndarray:
    """0..1 weight of the second colour at every pixel, shaped to broadcast over (height, width, 1)."""
    xs = np.arange(width, dtype=np.float32)[None, :, None]
    ys = np.arange(height, dtype=np.float32)[:, None, None]
    if bg.kind == "gradient":
        return ys / (height - 1) if bg.direction == "vertical" else xs / (width - 1)
    period = bg.period * min(width, height)
    if bg.kind == "checks":
        return (xs // period + ys // period) % 2
    coord = {"vertical": xs, "horizontal": ys, "diagonal": xs + ys}[bg.direction]
    return (coord // period) % 2


def render_background(bg: Background, width: int, height: int) -> Image.Image:
    if bg.kind == "texture":
        return _texture_crop(bg, width, height)
    if bg.kind == "solid":
        return Image.new("RGB", (width, height), COLOURS[bg.colours[0]])
    first, second = (np.array(COLOURS[c], np.float32) for c in bg.colours)
    rgb = np.broadcast_to(first + (second - first) * _pattern(bg, width, height), (height, width, 3))
    return Image.fromarray(rgb.round().astype(np.uint8))


def render_objects(scene: Scene) -> tuple[Image.Image, Image.Image]:
    layer = Image.new("RGB", (scene.width, scene.height), (0, 0, 0))
    alpha = Image.new("L", (scene.width, scene.height), 0)
    rng = np.random.default_rng([scene.seed, 1])
    instances = [g for g in scene.objects for _ in range(g.count)]
    places = slots(scene.layout, len(instances), scene.width, scene.height, rng)
    for i, (group, (cx, cy, size)) in enumerate(zip(instances, places)):
        size = max(size, 8)
        if group.category == "shape":
            angle_step = 0 if group.kind in ("circle", "ring", "heart") else int(rng.integers(0, 6))
            mask = shape_mask(group.kind, size, angle_step)
            fill = _shaded_fill(group.colour, size)
        else:
            photo, mask = cutout(group.kind, size, mirrored=bool(i % 2))
            fill = photo if group.category == "photo" else _shaded_fill(group.colour, size).crop((0, 0) + mask.size)
        box = (cx - mask.width // 2, cy - mask.height // 2)
        layer.paste(fill, box, mask)
        alpha.paste(mask, box, mask)
    return layer, alpha


@lru_cache(maxsize=None)
def lighting_table(lighting: str) -> list[int]:
    """Per-channel tone curves for Image.point: 256 entries for R, then G, then B."""
    x = np.arange(256, dtype=np.float32)
    if lighting == "bright":
        curves = [255 - (255 - x) * 0.75] * 3
    elif lighting == "dim":
        curves = [x * 0.5] * 3
    elif lighting in ("warm", "cool"):
        gains = (1.15, 1.0, 0.72) if lighting == "warm" else (0.75, 0.95, 1.2)
        curves = [x * g for g in gains]
    elif lighting == "backlit":
        curves = [x * 0.5] * 3  # applied to the objects only: the glow is behind them
    else:
        curves = [x] * 3
    return np.clip(np.concatenate(curves), 0, 255).round().astype(np.uint8).tolist()


@lru_cache(maxsize=64)
def _backlight_glow(width: int, height: int) -> Image.Image:
    xs = (np.arange(width, dtype=np.float32)[None, :] - width / 2) / (0.45 * width)
    ys = (np.arange(height, dtype=np.float32)[:, None] - height * 0.45) / (0.45 * height)
    glow = np.exp(-(xs**2 + ys**2)) * 150 + 25
    return Image.fromarray(np.clip(glow, 0, 255).round().astype(np.uint8)).convert("RGB")


SHADOW_TABLE = [255 - round(0.35 * v) for v in range(256)]
BACKLIT_BACKGROUND_TABLE = [round(v * 0.6) for v in range(256)] * 3


def _drop_shadow(alpha: Image.Image) -> Image.Image:
    blurred = alpha.filter(ImageFilter.BoxBlur(4)).transform(alpha.size, Image.Transform.AFFINE, (1, 0, -4, 0, 1, -5))
    return Image.merge("RGB", (blurred.point(SHADOW_TABLE),) * 3)


def render_scene(scene: Scene) -> Image.Image:
    bg = render_background(scene.background, scene.width, scene.height)
    layer, alpha = render_objects(scene)
    bg = ImageChops.multiply(bg, _drop_shadow(alpha))
    if scene.lighting == "backlit":
        bg = ImageChops.add(bg.point(BACKLIT_BACKGROUND_TABLE), _backlight_glow(*bg.size))
        image = Image.composite(layer.point(lighting_table("backlit")), bg, alpha)
    else:
        image = Image.composite(layer, bg, alpha).point(lighting_table(scene.lighting))
    if scene.effect == "noise":
        noise = np.random.default_rng([scene.seed, 2]).standard_normal((scene.height, scene.width, 3), np.float32)
        image = Image.fromarray(np.clip(np.asarray(image) + 10 * noise, 0, 255).round().astype(np.uint8))
    elif scene.effect == "blur":
        image = image.filter(ImageFilter.GaussianBlur(1.8))
    return image


def encode_jpeg(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def near_duplicate(image: Image.Image, transform: str, rng: np.random.Generator) -> Image.Image:
    w, h = image.size
    if transform == "jitter":
        dx, dy = (int(v) for v in rng.integers(-3, 4, size=2))
        gain = float(rng.uniform(0.96, 1.04))
        padded = np.pad(np.asarray(image, np.float32), ((3, 3), (3, 3), (0, 0)), mode="edge")
        shifted = padded[3 + dy:3 + dy + h, 3 + dx:3 + dx + w]
        return Image.fromarray(np.clip(shifted * gain, 0, 255).round().astype(np.uint8))
    if transform == "reencode":
        return Image.open(io.BytesIO(encode_jpeg(image, int(rng.integers(60, 80))))).convert("RGB")
    if transform == "crop":
        left, top, right, bottom = (int(v) for v in rng.integers(0, 1 + max(w, h) // 14, size=4))
        return image.crop((left, top, w - right, h - bottom))
    scale = float(rng.uniform(0.75, 0.92))
    return image.resize((round(w * scale), round(h * scale)), Image.Resampling.BILINEAR, reducing_gap=2.0)


def render_sample(sample: Sample) -> tuple[bytes, tuple[int, int]]:
    if sample.copy_kind == "exact_duplicate":
        return render_sample(sample.source)
    image = render_scene(sample.scene)
    if sample.copy_kind == "near_duplicate":
        image = near_duplicate(image, sample.transform, np.random.default_rng([sample.copy_seed, 3]))
    return encode_jpeg(image), image.size


# ---------------------------------------------------------------- writing


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, samples: list[Sample]) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            jpeg, (width, height) = render_sample(sample)
            meta = {
                "key": sample.key, "url": sample.url, "caption": sample.caption, "re_caption": sample.re_caption,
                "width": width, "height": height, "attributes": attributes_of(sample),
            }
            _tar_member(tar, f"{sample.key}.jpg", jpeg)
            _tar_member(tar, f"{sample.key}.json", json.dumps(meta, ensure_ascii=False).encode())
            _tar_member(tar, f"{sample.key}.txt", sample.caption.encode())
    write_bytes_atomic(path, buf.getvalue())


def shard_stats(count: int) -> bytes:
    stats = {"count": count, "successes": count, "failed_to_download": 0, "failed_to_resize": 0,
             "status_dict": {"success": count}}
    return json.dumps(stats, indent=4).encode()


def _remove_stale_shards(out: Path, shards: int) -> None:
    # A smaller rerun into the same folder must not leave the old run's tail shards behind for globs to find.
    for path in sorted(out.glob("[0-9][0-9][0-9][0-9][0-9]*")):
        index, suffix = path.name[:5], path.name[5:]
        if index.isdigit() and int(index) >= shards and suffix in (".tar", "_stats.json"):
            path.unlink()


def make_corpus(out_dir: str | Path, images: int, seed: int = 0, shard_size: int = 256,
                image_size: tuple[int, int] = (320, 256), progress: bool = False) -> dict:
    if not 0 < shard_size <= 10**KEY_DIGITS_PER_SHARD:
        raise ValueError(f"shard_size must be in 1..{10**KEY_DIGITS_PER_SHARD}")
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    samples = plan_corpus(images, seed, tuple(image_size), shard_size)
    shards = [samples[i:i + shard_size] for i in range(0, len(samples), shard_size)]
    for shard, members in enumerate(shards):
        write_shard(out / f"{shard:05d}.tar", members)
        write_bytes_atomic(out / f"{shard:05d}_stats.json", shard_stats(len(members)))
        if progress:
            print(f"synthetic corpus: shard {shard + 1}/{len(shards)}", file=sys.stderr, flush=True)
    _remove_stale_shards(out, len(shards))
    family_sizes = Counter(s.scene.family for s in samples if s.copy_kind is None)
    return {
        "images": len(samples),
        "shards": len(shards),
        "families": len({s.scene.family for s in samples}),
        "singletons": sum(n == 1 for n in family_sizes.values()),
        "exact_duplicates": sum(s.copy_kind == "exact_duplicate" for s in samples),
        "near_duplicates": sum(s.copy_kind == "near_duplicate" for s in samples),
        "captionless": sum(s.caption == "" for s in samples),
        "seconds": round(time.perf_counter() - started, 2),
    }


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=int, default=256)
    args = parser.parse_args()
    print(json.dumps(make_corpus(args.out_dir, args.images, args.seed, args.shard_size, progress=True)))
