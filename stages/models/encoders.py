"""Embedding models behind two small interfaces: images in, vectors out; texts in, vectors out.

Any transformers model folder or hub id works: CLIP/SigLIP-style towers use their projection
(`get_image_features` / `get_text_features`), other backbones their pooled output (DINOv2:
the normalised CLS token) and sentence encoders mean pooling. Image preprocessing is read
from the model's image processor config and runs on the model's device, on uint8 tensors,
so decoding is the only per-image CPU work; towers that share a resize/crop geometry share
one resized batch (`preprocess`).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from stages import models as _registered  # noqa: F401  (registers local model types with the Auto classes)

Pooling = Literal["auto", "projection", "pooler", "cls", "mean"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def quiet_loading() -> None:
    """No per-tensor "Loading weights" bars from transformers in workers' logs."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def looks_local(name: str) -> bool:
    """Hub ids are `owner/name`; anything else (./x, /x, ~/x, a/b/c) or an existing path is a folder."""
    return name.startswith((".", "/", "~")) or name.count("/") >= 2 or os.path.exists(os.path.expanduser(name))


def check_model_path(name: str, what: str) -> None:
    """A model given as a local folder must exist and hold a config.json; hub ids are checked when loaded."""
    path = Path(os.path.expanduser(name))
    if looks_local(name):
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{what}: model folder {name} does not exist or has no config.json")


@dataclass(frozen=True)
class ImageTransform:
    """Resize (shortest edge or fixed size), center-crop, rescale and normalise, as the model's processor says."""

    shortest_edge: int | None
    size: tuple[int, int] | None
    crop: tuple[int, int] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale: float
    bicubic: bool

    @classmethod
    def from_pretrained(cls, name: str) -> "ImageTransform":
        from transformers import AutoImageProcessor

        p = AutoImageProcessor.from_pretrained(name)
        size = _size_dict(getattr(p, "size", None))
        crop = _size_dict(getattr(p, "crop_size", None)) if getattr(p, "do_center_crop", False) else {}
        return cls(
            shortest_edge=size.get("shortest_edge"),
            size=(size["height"], size["width"]) if "height" in size else None,
            crop=(crop["height"], crop["width"]) if crop else None,
            mean=tuple(p.image_mean) if getattr(p, "do_normalize", True) else (0.0, 0.0, 0.0),
            std=tuple(p.image_std) if getattr(p, "do_normalize", True) else (1.0, 1.0, 1.0),
            rescale=float(getattr(p, "rescale_factor", 1 / 255)) if getattr(p, "do_rescale", True) else 1.0,
            bicubic=_is_bicubic(getattr(p, "resample", 3)),
        )

    @property
    def geometry(self) -> tuple:
        """What `resize_crop` depends on: models that share it share one resized batch."""
        return (self.shortest_edge, self.size, self.crop, self.bicubic)

    def __call__(self, images: list[torch.Tensor], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """uint8 CHW tensors of any sizes -> one normalised NCHW batch on `device`."""
        return self.normalise(self.resize_crop(images, device), dtype)

    def resize_crop(self, images: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        """uint8 CHW tensors of any sizes -> one float NCHW batch in [0, 255] on `device`, in input order."""
        groups: dict[tuple, list[int]] = {}
        for i, img in enumerate(images):  # same-sized images resize in one call: the same values, fewer kernels
            groups.setdefault((img.device, *img.shape[-2:]), []).append(i)  # GPU-decoded and PIL-decoded apart
        out: list[torch.Tensor | None] = [None] * len(images)
        for idx in groups.values():
            x = self._resize_crop_group(torch.stack([images[i] for i in idx]).to(device, non_blocking=True).float())
            for j, i in enumerate(idx):
                out[i] = x[j : j + 1]
        return torch.cat(out).clamp_(0, 255)

    def _resize_crop_group(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if self.size:
            th, tw = self.size
        elif h <= w:  # as transformers' processors: short side exact, long side floored
            th, tw = self.shortest_edge, max(1, int(self.shortest_edge * w / h))
        else:
            th, tw = max(1, int(self.shortest_edge * h / w)), self.shortest_edge
        if (th, tw) != (h, w):
            x = F.interpolate(x, size=(th, tw), mode="bicubic" if self.bicubic else "bilinear", antialias=True, align_corners=False)
        if self.crop:
            ch, cw = self.crop
            top, left = max(0, (th - ch) // 2), max(0, (tw - cw) // 2)
            x = x[..., top : top + ch, left : left + cw]
            if x.shape[-2:] != (ch, cw):  # image smaller than the crop: pad like the processors do
                x = F.pad(x, (0, cw - x.shape[-1], 0, ch - x.shape[-2]))
        return x

    def normalise(self, batch: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A `resize_crop` batch -> the model's input: rescaled, normalised, in `dtype`."""
        mean = _constant(self.mean, batch.device)
        std = _constant(self.std, batch.device)
        return ((batch * self.rescale - mean) / std).to(dtype)


def _size_dict(size) -> dict:
    """A processor's size: a dict, or (torchvision-backed processors) a SizeDict whose unset fields are None."""
    if not size:
        return {}
    if isinstance(size, dict):
        return dict(size)
    return {k: getattr(size, k) for k in ("height", "width", "shortest_edge") if getattr(size, k, None) is not None}


def _is_bicubic(resample) -> bool:
    """PIL's resample code 3, or torchvision's InterpolationMode.BICUBIC (fast processors)."""
    value = getattr(resample, "value", resample)
    return str(value if value is not None else 3).lower() in ("3", "bicubic")


@functools.lru_cache(maxsize=64)
def _constant(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """Mean/std as a [1, C, 1, 1] tensor, made once per device (no host-to-device copy per batch)."""
    return torch.tensor(values, device=device).view(1, len(values), 1, 1)


@torch.inference_mode()
def preprocess(encoders: dict[str, "ImageEncoder"], images: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each encoder's pixel batch from one list of decoded images, resizing once per distinct geometry."""
    resized: dict[tuple, torch.Tensor] = {}
    pixels = {}
    for name, enc in encoders.items():
        geometry = enc.transform.geometry
        if geometry not in resized:
            resized[geometry] = enc.transform.resize_crop(images, enc.device)
        pixels[name] = enc.transform.normalise(resized[geometry], enc.dtype).contiguous(memory_format=torch.channels_last)
    return pixels


class ImageEncoder:
    def __init__(self, name: str, device: torch.device, dtype: torch.dtype, pooling: Pooling = "auto"):
        from transformers import AutoConfig, AutoModel

        quiet_loading()
        config = AutoConfig.from_pretrained(name)
        # channels-last: convolutions run faster on CPU (oneDNN) and on tensor cores; ViTs do not mind
        self.model = _load_tower(name, config, "vision", AutoModel, dtype).to(device, memory_format=torch.channels_last).eval()
        self.pooling = _resolve_pooling(self.model, pooling, "image")
        self.transform = ImageTransform.from_pretrained(name)
        self.device, self.dtype = device, dtype

    @property
    def attn_implementation(self) -> str | None:
        """The attention kernel transformers resolved ("sdpa" for the ViTs); None for convolutional models."""
        return _attn_implementation(self.model)

    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        return self.embed(preprocess({"": self}, images)[""])

    @functools.cached_property
    def dim(self) -> int:
        """Width of the vectors, as the model gives them (one forward of a blank image, once)."""
        return int(self([torch.zeros(3, 16, 16, dtype=torch.uint8)]).shape[-1])

    @torch.inference_mode()
    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """A preprocessed batch -> L2-normalised float32 features, on the model's device."""
        if self.pooling == "projection" and hasattr(self.model, "get_image_features"):  # *ModelWithProjection towers have none
            out = self.model.get_image_features(pixel_values=pixels)
            feats = out if isinstance(out, torch.Tensor) else out.pooler_output
        else:
            feats = _pool(self.model(pixel_values=pixels), self.pooling, None)
        return F.normalize(feats.float(), dim=-1)


class TextEncoder:
    def __init__(self, name: str, device: torch.device, dtype: torch.dtype, pooling: Pooling = "auto", max_length: int = 128):
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        quiet_loading()
        config = AutoConfig.from_pretrained(name)
        self.tokenizer = AutoTokenizer.from_pretrained(name)
        self.model = _load_tower(name, config, "text", AutoModel, dtype).to(device).eval()
        self.pooling = _resolve_pooling(self.model, pooling, "text")
        self.max_length = min(max_length, getattr(self.tokenizer, "model_max_length", max_length) or max_length)
        self.device = device

    @property
    def attn_implementation(self) -> str | None:
        return _attn_implementation(self.model)

    def lengths(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]]

    def tokenize(self, texts: list[str]):
        """One padded batch of token ids on the model's device."""
        return self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt").to(self.device)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return self.embed(self.tokenize(texts))

    @functools.cached_property
    def dim(self) -> int:
        """Width of the vectors, as the model gives them (one forward of a one-word text, once)."""
        return int(self(["a"]).shape[-1])

    @torch.inference_mode()
    def embed(self, batch) -> torch.Tensor:
        """A `tokenize` batch -> L2-normalised float32 features, on the model's device."""
        if self.pooling == "projection" and hasattr(self.model, "get_text_features"):
            out = self.model.get_text_features(**batch)
            feats = out if isinstance(out, torch.Tensor) else out.pooler_output
        else:
            feats = _pool(self.model(**batch), self.pooling, batch["attention_mask"])
        return F.normalize(feats.float(), dim=-1)


def _attn_implementation(model) -> str | None:
    has_attention = any("Attention" in type(m).__name__ for m in model.modules())
    return getattr(model.config, "_attn_implementation", None) if has_attention else None


def _load_tower(name: str, config, modality: str, auto_cls, dtype: torch.dtype):
    """For dual encoders (CLIP, SigLIP) load only the tower we need, with its projection."""
    import transformers

    kwargs = {"dtype": dtype}
    if getattr(config, f"{modality}_config", None) is not None and hasattr(config, "projection_dim"):
        cls_name = {"clip": "CLIP", "chinese_clip": "ChineseCLIP"}.get(config.model_type)
        if cls_name:
            tower = getattr(transformers, f"{cls_name}{'Vision' if modality == 'vision' else 'Text'}ModelWithProjection")
            return tower.from_pretrained(name, **kwargs)
    return auto_cls.from_pretrained(name, **kwargs)


def _resolve_pooling(model, pooling: Pooling, modality: str) -> Pooling:
    if pooling != "auto":
        return pooling
    fn = "get_image_features" if modality == "image" else "get_text_features"
    if hasattr(model, fn) or type(model).__name__.endswith("ModelWithProjection"):
        return "projection"
    return "pooler" if modality == "image" else "mean"


def _pool(out, pooling: Pooling, mask: torch.Tensor | None) -> torch.Tensor:
    for attr in ("image_embeds", "text_embeds"):  # *ModelWithProjection outputs
        if getattr(out, attr, None) is not None and pooling in ("projection", "pooler"):
            return getattr(out, attr)
    if pooling == "pooler" and getattr(out, "pooler_output", None) is not None:
        return out.pooler_output.flatten(1)
    hidden = out.last_hidden_state
    if hidden.dim() == 4:  # convolutional feature map
        return hidden.mean(dim=(2, 3))
    if pooling == "cls":
        return hidden[:, 0]
    if mask is None:
        return hidden.mean(dim=1)
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
