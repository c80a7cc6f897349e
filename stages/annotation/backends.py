"""Text generation backends of the annotate stage.

A backend takes chat requests (a user message of text and, for the describer, images) and
returns one answer each, or a `Failed(reason)` for a request the backend could not answer.
Every backend samples with the request's own seed, so an answer depends on the request and
its seed only, never on which requests shared its batch: reruns, resumed runs and the
answer cache all agree.

- `transformers`: the model runs in the worker; batched `generate`, requests sorted by
  length, left padding, per-request sampling.
- `openai`: any OpenAI-compatible chat-completions endpoint (vLLM serve, SGLang, TGI, a
  hosted API), with bounded concurrency, timeouts and retries.
- `vllm`: vLLM's offline engine inside the worker (continuous batching, tensor parallelism).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import email.utils
import io
import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import Annotated, Literal, Protocol, Union

from PIL import Image
from pydantic import Discriminator, Field, Tag

from stages.base import StageError, StageSettings

log = logging.getLogger("megasynth.annotate")


@dataclass(frozen=True)
class ChatRequest:
    text: str
    images: tuple[Image.Image, ...] = field(default=(), compare=False)
    seed: int = 0


@dataclass(frozen=True)
class Failed:
    """A request the backend could not answer (e.g. HTTP 400); the pair is retried, then rejected with `reason`."""

    reason: str


Answer = Union[str, Failed]


class BackendError(StageError):
    """The backend cannot work at all (unreachable after retries, key refused): the unit fails and a rerun resumes."""


class Generator(Protocol):
    model_name: str

    def generate(self, requests: list[ChatRequest]) -> list[Answer]: ...


class _Common(StageSettings):
    model: str = Field(description="HF hub id or local folder (transformers, vllm), or the served model name (openai)")
    max_new_tokens: int = Field(256, gt=0)
    temperature: float = Field(0.7, ge=0, description="0 = greedy")
    top_p: float = Field(0.9, gt=0, le=1)

    def answer_fingerprint(self) -> dict:
        """What decides an answer besides the request and its seed: part of the cache key.

        Each backend adds its own settings that change answers, numerics included (dtype,
        KV-cache kind, the server asked, the JPEG quality of the images it is sent); settings
        that only change speed or robustness (batch size, concurrency, timeouts) stay out.
        """
        return {"backend": self.backend, "model": self.model, "max_new_tokens": self.max_new_tokens,
                "temperature": self.temperature, "top_p": self.top_p}  # fmt: skip


class TransformersSettings(_Common):
    backend: Literal["transformers"] = "transformers"
    batch_size: int = Field(16, gt=0)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cache_implementation: Literal["dynamic", "static"] = Field("dynamic", description="static: a fixed-size KV cache (helps with torch.compile on GPU)")

    def answer_fingerprint(self) -> dict:
        # device: CPU and GPU kernels differ in numerics; "auto" is kept as written, not resolved
        return {**super().answer_fingerprint(), "dtype": self.dtype, "device": self.device,
                "cache_implementation": self.cache_implementation}  # fmt: skip


class OpenAISettings(_Common):
    backend: Literal["openai"]
    base_url: str = Field(description="e.g. http://localhost:8000/v1")
    api_key_env: str | None = Field(None, description="name of the environment variable holding the key (never the key)")
    max_concurrency: int = Field(16, gt=0)
    timeout_s: float = Field(120.0, gt=0, description="per request")
    max_retries: int = Field(6, ge=0, description="on 429, 5xx, timeouts and connection errors")
    backoff_s: float = Field(1.0, ge=0, description="first wait; doubles per retry unless the server sends Retry-After")
    image_quality: int = Field(90, ge=1, le=100, description="JPEG quality of the images sent as data URLs")

    def answer_fingerprint(self) -> dict:
        # the same served model name on another server may be another model, precision or version
        return {**super().answer_fingerprint(), "base_url": self.base_url.rstrip("/"), "image_quality": self.image_quality}


class VLLMSettings(_Common):
    backend: Literal["vllm"]
    tensor_parallel_size: int = Field(1, gt=0)
    gpu_memory_utilization: float = Field(0.45, gt=0, le=1, description="describer and instructor share the worker's GPU")
    max_model_len: int | None = None
    dtype: str = "auto"
    image_quality: int = Field(90, ge=1, le=100)

    def answer_fingerprint(self) -> dict:
        # tensor parallelism changes the order of reductions, hence the numerics
        return {**super().answer_fingerprint(), "dtype": self.dtype, "tensor_parallel_size": self.tensor_parallel_size,
                "image_quality": self.image_quality}  # fmt: skip


def _backend_of(v) -> str:
    return v.get("backend", "transformers") if isinstance(v, dict) else getattr(v, "backend", "transformers")


# `backend` chooses the settings class; transformers when it is left out.
GeneratorSettings = Annotated[
    Union[
        Annotated[TransformersSettings, Tag("transformers")],
        Annotated[OpenAISettings, Tag("openai")],
        Annotated[VLLMSettings, Tag("vllm")],
    ],
    Discriminator(_backend_of),
]


def make_generator(settings, vision: bool) -> Generator:
    return {"transformers": TransformersGenerator, "openai": OpenAIGenerator, "vllm": VLLMGenerator}[settings.backend](settings, vision)


def gpus_needed(settings) -> float:
    """GPUs one worker asks Ray for on behalf of this generator."""
    if settings.backend == "transformers":
        from stages.models.encoders import resolve_device

        return 1.0 if resolve_device(settings.device).type == "cuda" else 0.0
    if settings.backend == "vllm":
        return 1.0 if settings.tensor_parallel_size == 1 else 0.0  # with TP > 1 vLLM places its own Ray workers
    return 0.0


# --- requests as OpenAI chat messages (the openai and vllm backends) -------------------------------


def data_url(img: Image.Image, quality: int) -> str:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def chat_messages(req: ChatRequest, image_quality: int = 90) -> list[dict]:
    """The request as OpenAI chat messages: images first (as data URLs), then the text."""
    if not req.images:
        return [{"role": "user", "content": req.text}]
    content = [{"type": "image_url", "image_url": {"url": data_url(im, image_quality)}} for im in req.images]
    return [{"role": "user", "content": [*content, {"type": "text", "text": req.text}]}]


def chat_payload(settings: OpenAISettings, req: ChatRequest) -> dict:
    return {
        "model": settings.model,
        "messages": chat_messages(req, settings.image_quality),
        "max_tokens": settings.max_new_tokens,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "seed": req.seed,
    }


# --- transformers ------------------------------------------------------------------------------


class PerRequestSampler:
    """A logits processor that samples every row with its own seeded stream (temperature, then top-p).

    It returns scores that are 0 for the chosen token and -inf elsewhere, so greedy decoding
    keeps exactly that token: a row's answer does not depend on the other rows of its batch.
    Only one uniform number per row crosses to the device per step; sampling is an
    inverse-CDF lookup, vectorised over the batch.
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        self.temperature, self.top_p = temperature, top_p
        self.streams = [random.Random(s) for s in seeds]

    def __call__(self, input_ids, scores):
        import torch

        if self.temperature == 0:
            return scores
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        sorted_p, order = probs.sort(dim=-1, descending=True)
        if self.top_p < 1:  # keep the smallest head of the distribution that reaches top_p
            sorted_p = sorted_p * ((sorted_p.cumsum(-1) - sorted_p) < self.top_p)
        cdf = sorted_p.cumsum(-1)
        u = torch.tensor([r.random() for r in self.streams], dtype=cdf.dtype).to(cdf.device).unsqueeze(1) * cdf[:, -1:]
        pick = torch.searchsorted(cdf, u).clamp_(max=cdf.shape[-1] - 1)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, order.gather(1, pick), 0.0)


class TransformersGenerator:
    """Batched `generate` with left padding; requests of similar length share a batch."""

    def __init__(self, settings: TransformersSettings, vision: bool):
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

        from stages.models.encoders import DTYPES, quiet_loading, resolve_device

        quiet_loading()
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
        # Sampling happens in PerRequestSampler; the model's own sampling defaults must not apply.
        self.model.generation_config.update(do_sample=False, temperature=None, top_p=None, top_k=None)

    def _prompt(self, req: ChatRequest) -> str:
        if self.vision:
            content = [{"type": "image"} for _ in req.images] + [{"type": "text", "text": req.text}]
        else:
            content = req.text
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)

    def generate(self, requests: list[ChatRequest]) -> list[Answer]:
        prompts = [self._prompt(r) for r in requests]
        order = sorted(range(len(requests)), key=lambda i: (len(prompts[i]), i))  # less padding per batch
        out: list[Answer] = [""] * len(requests)
        bs = self.settings.batch_size
        for s in range(0, len(order), bs):
            idx = order[s : s + bs]
            for i, text in zip(idx, self._generate_batch([prompts[i] for i in idx], [requests[i] for i in idx])):
                out[i] = text
        return out

    def _generate_batch(self, prompts: list[str], requests: list[ChatRequest]) -> list[str]:
        import torch
        from transformers import LogitsProcessorList

        if self.vision:
            inputs = self.processor(text=prompts, images=[list(r.images) for r in requests], padding=True, return_tensors="pt")
        else:
            inputs = self.tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
        inputs = inputs.to(self.device)
        s = self.settings
        sampler = PerRequestSampler([r.seed for r in requests], s.temperature, s.top_p)
        extra = {"cache_implementation": "static"} if s.cache_implementation == "static" else {}
        with torch.inference_mode():
            generated = self.model.generate(
                **inputs, max_new_tokens=s.max_new_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id,
                logits_processor=LogitsProcessorList([sampler]), **extra,
            )  # fmt: skip
        new = generated[:, inputs["input_ids"].shape[1] :]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]


# --- openai-compatible endpoints -----------------------------------------------------------------

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class OpenAIGenerator:
    """Chat completions over HTTP with bounded concurrency; retries honour Retry-After, then back off exponentially."""

    def __init__(self, settings: OpenAISettings, vision: bool):
        self.settings, self.model_name = settings, settings.model
        self._key = api_key(settings)
        self.url = settings.base_url.rstrip("/") + "/chat/completions"

    def generate(self, requests: list[ChatRequest]) -> list[Answer]:
        return asyncio.run(self._all(requests))

    async def _all(self, requests: list[ChatRequest]) -> list[Answer]:
        """`max_concurrency` workers, each on its own keep-alive connection, take requests in turn.

        One client per connection rather than one shared pool: httpcore's pool scans every
        connection for every request, which at 64 connections costs more CPU than the requests.
        """
        import httpx

        s = self.settings
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        answers: list[Answer | None] = [None] * len(requests)
        todo = collections.deque(enumerate(requests))
        tls = httpx.create_ssl_context()  # built once: each client would otherwise load the CA store again (~25 ms)

        async def worker() -> None:
            limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
            async with httpx.AsyncClient(headers=headers, timeout=s.timeout_s, limits=limits, verify=tls) as client:
                while todo:
                    i, req = todo.popleft()
                    answers[i] = await self._request(client, req)

        await asyncio.gather(*(worker() for _ in range(min(s.max_concurrency, len(requests)))))
        return answers  # type: ignore[return-value]

    async def _request(self, client, req: ChatRequest) -> Answer:
        """One request, retried as is (same seed: the same answer) on transient trouble."""
        import httpx

        s = self.settings
        payload = chat_payload(s, req)
        last = ""
        for attempt in range(s.max_retries + 1):
            wait = s.backoff_s * (2**attempt) * (0.5 + random.random() / 2)
            try:
                r = await client.post(self.url, json=payload)
            except httpx.TimeoutException:
                last = "timeout"
            except httpx.TransportError as e:
                last = f"connection error ({type(e).__name__})"
            else:
                if r.status_code == 200:
                    answer = _answer_of(r)
                    if answer is not None:
                        return answer
                    last = "malformed response"  # a cut-off body is usually transient: ask again
                elif r.status_code in (401, 403):
                    raise BackendError(f"{s.base_url} refused the API key{_key_source(s)} (HTTP {r.status_code})")
                elif r.status_code not in RETRY_STATUS:
                    return Failed(f"http_{r.status_code}")
                else:
                    last = f"HTTP {r.status_code}"
                    wait = _retry_after(r.headers.get("retry-after"), wait)
            if attempt < s.max_retries:
                log.info("%s: %s, retrying in %.1fs", s.base_url, last, wait)
                await asyncio.sleep(wait)
        if last == "malformed response":  # the server answers, but not in the expected shape: this request fails
            return Failed("malformed_response")
        raise BackendError(f"{s.base_url}: gave up after {s.max_retries + 1} attempts, last: {last}")


def api_key(settings: OpenAISettings) -> str | None:
    if settings.api_key_env is None:
        return None
    key = os.environ.get(settings.api_key_env)
    if not key:
        raise ValueError(f"api_key_env: the environment variable {settings.api_key_env} is not set")
    return key


def _key_source(s: OpenAISettings) -> str:
    return f" from ${s.api_key_env}" if s.api_key_env else " (none was sent: set api_key_env)"


def _answer_of(response) -> str | None:
    """The completion's text, or None when the body is not a chat completion."""
    try:
        content = response.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return content.strip() if isinstance(content, str) else None


def _retry_after(value: str | None, default: float) -> float:
    """Retry-After as seconds or an HTTP date; the default when absent or unreadable."""
    if not value:
        return default
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, when.timestamp() - time.time()) if when else default


# --- vLLM offline engine -------------------------------------------------------------------------


class VLLMGenerator:
    """vLLM's engine in this worker: all requests of a call go in at once; vLLM batches continuously."""

    def __init__(self, settings: VLLMSettings, vision: bool):
        try:
            from vllm import LLM
        except ImportError as e:
            raise ImportError("the vllm backend needs vLLM: pip install 'megasynth[vllm]'") from e
        self.settings, self.model_name = settings, settings.model
        kwargs = dict(
            model=settings.model, tensor_parallel_size=settings.tensor_parallel_size, dtype=settings.dtype,
            gpu_memory_utilization=settings.gpu_memory_utilization, max_model_len=settings.max_model_len,
        )  # fmt: skip
        if vision:
            kwargs["limit_mm_per_prompt"] = {"image": 2}
        if settings.tensor_parallel_size > 1:
            kwargs["distributed_executor_backend"] = "ray"
        self.llm = LLM(**kwargs)

    def generate(self, requests: list[ChatRequest]) -> list[Answer]:
        from vllm import SamplingParams

        s = self.settings
        params = [SamplingParams(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens, seed=r.seed) for r in requests]
        outputs = self.llm.chat([chat_messages(r, s.image_quality) for r in requests], sampling_params=params, use_tqdm=False)
        return [o.outputs[0].text.strip() if o.outputs else Failed("empty_output") for o in outputs]
