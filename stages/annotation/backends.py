"""Text generation backends of the annotate stage.

A backend takes chat requests (a user message of text and, for the describer, images) and
returns one completion each. `transformers` runs the model in the worker with batched
`generate`: any model whose processor or tokenizer has a chat template works, vision
models through `AutoModelForImageTextToText`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal, Protocol

from PIL import Image
from pydantic import Field

from stages.base import StageSettings


@dataclass(frozen=True)
class ChatRequest:
    text: str
    images: tuple[Image.Image, ...] = field(default=(), compare=False)
    seed: int = 0


class Generator(Protocol):
    model_name: str

    def generate(self, requests: list[ChatRequest]) -> list[str]: ...


class GeneratorSettings(StageSettings):
    backend: Literal["transformers"] = "transformers"
    model: str = Field(description="HF hub id or local folder")
    batch_size: int = Field(16, gt=0)
    max_new_tokens: int = Field(256, gt=0)
    temperature: float = Field(0.7, ge=0, description="0 = greedy")
    top_p: float = Field(0.9, gt=0, le=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"


def make_generator(settings: GeneratorSettings, vision: bool) -> Generator:
    if settings.backend == "transformers":
        return TransformersGenerator(settings, vision)
    raise ValueError(f"unknown backend {settings.backend!r}")


class TransformersGenerator:
    """Batched `generate` with left padding; requests of similar length share a batch."""

    def __init__(self, settings: GeneratorSettings, vision: bool):
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

        from stages.models.encoders import DTYPES, resolve_device

        self.settings, self.vision, self.model_name = settings, vision, settings.model
        self.device = resolve_device(settings.device)
        dtype = DTYPES.get(settings.dtype) or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        if vision:
            self.processor = AutoProcessor.from_pretrained(settings.model)
            self.tokenizer = self.processor.tokenizer
            self.model = AutoModelForImageTextToText.from_pretrained(settings.model, dtype=dtype)
        else:
            self.processor = self.tokenizer = AutoTokenizer.from_pretrained(settings.model)
            self.model = AutoModelForCausalLM.from_pretrained(settings.model, dtype=dtype)
        self.model.to(self.device).eval()
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def _prompt(self, req: ChatRequest) -> str:
        if self.vision:
            content = [{"type": "image"} for _ in req.images] + [{"type": "text", "text": req.text}]
        else:
            content = req.text
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)

    def generate(self, requests: list[ChatRequest]) -> list[str]:
        prompts = [self._prompt(r) for r in requests]
        order = sorted(range(len(requests)), key=lambda i: (len(prompts[i]), i))
        out: list[str] = [""] * len(requests)
        bs = self.settings.batch_size
        for s in range(0, len(order), bs):
            idx = order[s : s + bs]
            for i, text in zip(idx, self._generate_batch([prompts[i] for i in idx], [requests[i] for i in idx])):
                out[i] = text
        return out

    def _generate_batch(self, prompts: list[str], requests: list[ChatRequest]) -> list[str]:
        import torch

        if self.vision:
            inputs = self.processor(text=prompts, images=[list(r.images) for r in requests], padding=True, return_tensors="pt")
        else:
            inputs = self.tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
        inputs = inputs.to(self.device)
        s = self.settings
        # Sampling in a batch draws from one generator: seed it from the batch's request seeds.
        torch.manual_seed(_batch_seed(r.seed for r in requests))
        sampling = dict(do_sample=True, temperature=s.temperature, top_p=s.top_p) if s.temperature > 0 else dict(do_sample=False)
        with torch.inference_mode():
            generated = self.model.generate(**inputs, max_new_tokens=s.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id, **sampling)
        new = generated[:, inputs["input_ids"].shape[1] :]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]


def _batch_seed(seeds) -> int:
    return int.from_bytes(hashlib.blake2b(",".join(map(str, seeds)).encode(), digest_size=7).digest(), "big")
