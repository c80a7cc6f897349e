"""Embedding models behind two small interfaces: images in, vectors out; texts in, vectors out.

Any transformers model folder or hub id works: CLIP/SigLIP-style towers use their projection
(`get_image_features` / `get_text_features`), other backbones their pooled output (DINOv2:
the normalised CLS token) and sentence encoders mean pooling. Image preprocessing is read
from the model's image processor config and runs on the model's device, on uint8 tensors,
so decoding is the only per-image CPU work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from stages import models as _registered  # noqa: F401  (registers local model types with the Auto classes)

Pooling = Literal["auto", "projection", "pooler", "cls", "mean"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
        size = dict(getattr(p, "size", None) or {})
        crop = dict(getattr(p, "crop_size", None) or {}) if getattr(p, "do_center_crop", False) else {}
        return cls(
            shortest_edge=size.get("shortest_edge"),
            size=(size["height"], size["width"]) if "height" in size else None,
            crop=(crop["height"], crop["width"]) if crop else None,
            mean=tuple(p.image_mean) if getattr(p, "do_normalize", True) else (0.0, 0.0, 0.0),
            std=tuple(p.image_std) if getattr(p, "do_normalize", True) else (1.0, 1.0, 1.0),
            rescale=float(getattr(p, "rescale_factor", 1 / 255)) if getattr(p, "do_rescale", True) else 1.0,
            bicubic=int(getattr(p, "resample", 3) or 3) == 3,
        )

    @property
    def output_size(self) -> tuple[int, int]:
        if self.crop:
            return self.crop
        if self.size:
            return self.size
        return (self.shortest_edge, self.shortest_edge)

    def __call__(self, images: list[torch.Tensor], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """uint8 CHW tensors of any sizes -> one normalised NCHW batch on `device`."""
        mode = "bicubic" if self.bicubic else "bilinear"
        out = []
        for img in images:
            x = img.to(device, non_blocking=True).unsqueeze(0).float()
            h, w = x.shape[-2:]
            if self.size:
                th, tw = self.size
            elif h <= w:  # as transformers' processors: short side exact, long side floored
                th, tw = self.shortest_edge, max(1, int(self.shortest_edge * w / h))
            else:
                th, tw = max(1, int(self.shortest_edge * h / w)), self.shortest_edge
            if (th, tw) != (h, w):
                x = F.interpolate(x, size=(th, tw), mode=mode, antialias=True, align_corners=False)
            if self.crop:
                ch, cw = self.crop
                top, left = max(0, (th - ch) // 2), max(0, (tw - cw) // 2)
                x = x[..., top : top + ch, left : left + cw]
                if x.shape[-2:] != (ch, cw):  # image smaller than the crop: pad like the processors do
                    x = F.pad(x, (0, cw - x.shape[-1], 0, ch - x.shape[-2]))
            out.append(x)
        batch = torch.cat(out).clamp_(0, 255) * self.rescale
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        return ((batch - mean) / std).to(dtype)


class ImageEncoder:
    def __init__(self, name: str, device: torch.device, dtype: torch.dtype, pooling: Pooling = "auto"):
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(name)
        # channels-last: convolutions run faster on CPU (oneDNN) and on tensor cores; ViTs do not mind
        self.model = _load_tower(name, config, "vision", AutoModel, dtype).to(device, memory_format=torch.channels_last).eval()
        self.pooling = _resolve_pooling(self.model, pooling, "image")
        self.transform = ImageTransform.from_pretrained(name)
        self.device, self.dtype = device, dtype

    @torch.inference_mode()
    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        pixels = self.transform(images, self.device, self.dtype).contiguous(memory_format=torch.channels_last)
        if self.pooling == "projection":
            out = self.model.get_image_features(pixel_values=pixels)
            feats = out if isinstance(out, torch.Tensor) else out.pooler_output
        else:
            feats = _pool(self.model(pixel_values=pixels), self.pooling, None)
        return F.normalize(feats.float(), dim=-1)


class TextEncoder:
    def __init__(self, name: str, device: torch.device, dtype: torch.dtype, pooling: Pooling = "auto", max_length: int = 128):
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        config = AutoConfig.from_pretrained(name)
        self.tokenizer = AutoTokenizer.from_pretrained(name)
        self.model = _load_tower(name, config, "text", AutoModel, dtype).to(device).eval()
        self.pooling = _resolve_pooling(self.model, pooling, "text")
        self.max_length = min(max_length, getattr(self.tokenizer, "model_max_length", max_length) or max_length)
        self.device = device

    def lengths(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]]

    @torch.inference_mode()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt").to(self.device)
        if self.pooling == "projection":
            out = self.model.get_text_features(**batch)
            feats = out if isinstance(out, torch.Tensor) else out.pooler_output
        else:
            feats = _pool(self.model(**batch), self.pooling, batch["attention_mask"])
        return F.normalize(feats.float(), dim=-1)


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
