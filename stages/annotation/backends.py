"""Text generation backends of the annotate stage.

A backend takes chat requests (a user message of text and, for the describer, images) and
returns one answer each, or a `Failed(reason)` for a request the backend could not answer.
Every backend samples with the request's own seed, so an answer depends on the request and
its seed only, never on which requests shared its batch: reruns, resumed runs and the
answer cache all agree.

- `transformers`: the model runs in the worker; its own chat template, batched `generate`,
  requests sorted by length, left padding, per-request sampling; an answer ends at the model's
  end-of-turn token, and one cut off by `max_new_tokens` fails as `unfinished`.
- `openai`: any OpenAI-compatible chat-completions endpoint (vLLM serve, SGLang, TGI, a
  hosted API), with concurrency bounded across all workers, a deadline per request, capped
  retries, and credentials kept out of every file and log.
- `vllm`: vLLM's offline engine inside the worker (continuous batching, tensor parallelism).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import email.utils
import io
import ipaddress
import json
import logging
import os
import random
import re
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Annotated, Callable, Literal, Protocol, Union

from PIL import Image
from pydantic import Discriminator, Field, Tag, field_serializer, field_validator, model_validator

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
    base_url: str = Field(description="e.g. http://localhost:8000/v1; credentials in it (user:password@, ?key=) are "
                                      "sent but never written out: configs, ledger, logs and the card show ***")
    api_key_env: str | None = Field(None, description="name of the environment variable holding the key (never the key)")
    allow_plain_http_key: bool = Field(False, description="send the key or credentials over plain http:// to a host that "
                                                          "is not this machine (anyone on the path can read them)")
    max_concurrency: int = Field(16, gt=0, description="requests in flight to this endpoint from all annotate workers "
                                                       "together (split evenly between them, at least one each)")
    timeout_s: float = Field(120.0, gt=0, description="deadline of one request, whole: connecting, sending, waiting "
                                                      "and reading the full answer (a server trickling bytes is cut off)")
    max_retries: int = Field(6, ge=0, description="on 429, 5xx, timeouts and connection errors")
    backoff_s: float = Field(1.0, ge=0, description="first wait; doubles per retry unless the server sends Retry-After")
    max_retry_after_s: float = Field(120.0, ge=0, description="longest wait a server's Retry-After is obeyed for; a "
                                                              "longer one waits this long")
    image_quality: int = Field(90, ge=1, le=100, description="JPEG quality of the images sent as data URLs")

    @field_validator("base_url")
    @classmethod
    def _is_http_url(cls, v: str) -> str:
        try:
            parts = urllib.parse.urlsplit(v)
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError as e:
            raise ValueError(f"not a URL ({e})") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{redact_url(v)!r} is not an http:// or https:// URL with a host")
        return v

    @model_validator(mode="after")
    def _one_credential(self) -> "OpenAISettings":
        if self.api_key_env and urllib.parse.urlsplit(self.base_url).password is not None:
            raise ValueError("base_url holds a password and api_key_env names a key: both would be the Authorization header; use one")
        return self

    @field_serializer("base_url")
    def _redacted(self, v: str) -> str:
        return redact_url(v)  # every dump (config copy, ledger, card) is written without the credentials

    def answer_fingerprint(self) -> dict:
        # the same served model name on another server may be another model, precision or version; credentials are not part of it
        return {**super().answer_fingerprint(), "base_url": redact_url(self.base_url).rstrip("/"), "image_quality": self.image_quality}


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


def backend_union(transformers: type, openai: type, vllm: type):
    """A settings type whose `backend` chooses the class (transformers when it is left out); a step with settings of
    its own passes its subclasses of the three."""
    return Annotated[
        Union[Annotated[transformers, Tag("transformers")], Annotated[openai, Tag("openai")], Annotated[vllm, Tag("vllm")]],
        Discriminator(_backend_of),
    ]


GeneratorSettings = backend_union(TransformersSettings, OpenAISettings, VLLMSettings)


def make_generator(settings, vision: bool, workers: int = 1) -> Generator:
    """The backend for `settings`; `workers`: how many of the stage's workers run at once (they share an endpoint's concurrency)."""
    if settings.backend == "openai":
        return OpenAIGenerator(settings, vision, workers)
    return {"transformers": TransformersGenerator, "vllm": VLLMGenerator}[settings.backend](settings, vision)


def gpus_needed(settings) -> float:
    """GPUs one worker asks Ray for on behalf of this generator."""
    if settings.backend == "transformers":
        from stages.models.encoders import resolve_device

        return 1.0 if resolve_device(settings.device).type == "cuda" else 0.0
    if settings.backend == "vllm":
        return 1.0 if settings.tensor_parallel_size == 1 else 0.0  # with TP > 1 vLLM places its own Ray workers
    return 0.0


def run_coroutine(coro):
    """`asyncio.run`, also from inside a running event loop (Jupyter's, an async caller's): there it runs on a
    thread of its own, since a loop cannot be nested in the thread that runs one."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="megasynth-client") as pool:
        return pool.submit(asyncio.run, coro).result()


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


# --- one bad prompt fails only its request ----------------------------------------------------

# What a tokenizer, processor or engine raises for a request it cannot take (a lone surrogate, a
# prompt past the model's length), as opposed to the backend being broken.
PROMPT_ERRORS = (ValueError, TypeError)


def isolate_failures(generate: Callable[[list], list[Answer]], requests: list, errors: list[BaseException]) -> list[Answer]:
    """`generate(requests)`; when it raises a prompt error, the halves are tried in turn until each request
    that fails alone gets `Failed("bad_prompt")` (its error appended to `errors`), so one bad prompt costs its
    pair, not the batch. Answers do not depend on the batch (per-request seeds), so splitting changes none."""
    try:
        return generate(requests)
    except PROMPT_ERRORS as e:
        if len(requests) > 1:
            mid = len(requests) // 2
            return isolate_failures(generate, requests[:mid], errors) + isolate_failures(generate, requests[mid:], errors)
        errors.append(e)
        log.warning("a request the backend cannot take (its pair is rejected as bad_prompt): %s: %s", type(e).__name__, e)
        return [Failed("bad_prompt")]


def raise_if_backend_at_fault(requests: list, errors: list[BaseException]) -> None:
    """A prompt error from every request of a call of several is the backend's fault, not the prompts': raise the first."""
    if len(requests) > 1 and len(errors) == len(requests):
        raise errors[0]


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
        if not getattr(self.processor, "chat_template", None):
            raise BackendError(f"{settings.model} has no chat template (a base model, or a folder saved without its "
                               "tokenizer's chat_template): annotate asks instruction-tuned chat models")  # fmt: skip
        self.tokenizer.padding_side = "left"  # batched prompts end where generation starts
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # Where an answer ends: the model's end-of-turn token(s) (generation_config) and the tokenizer's end of sequence.
        self.stop_ids = sorted(stop_tokens(self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id))
        if not self.stop_ids:
            raise BackendError(f"{settings.model} names no end-of-sequence token (generation_config.json eos_token_id, or "
                               "the tokenizer's eos_token): generation could not stop at the end of an answer")  # fmt: skip
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

        def one_batch(idx: list[int]) -> list[Answer]:
            return self._generate_batch([prompts[i] for i in idx], [requests[i] for i in idx])

        order = sorted(range(len(requests)), key=lambda i: (len(prompts[i]), i))  # less padding per batch
        batches = [order[s : s + self.settings.batch_size] for s in range(0, len(order), self.settings.batch_size)]
        out: list[Answer] = [""] * len(requests)
        errors: list[BaseException] = []
        for idx in batches:
            for i, answer in zip(idx, isolate_failures(one_batch, idx, errors)):
                out[i] = answer
        raise_if_backend_at_fault(requests, errors)
        return out

    def _generate_batch(self, prompts: list[str], requests: list[ChatRequest]) -> list[Answer]:
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
                eos_token_id=self.stop_ids, logits_processor=LogitsProcessorList([sampler]), **extra,
            )  # fmt: skip
        new = generated[:, inputs["input_ids"].shape[1] :].tolist()
        return [self._answer(row) for row in new]

    def _answer(self, ids: list[int]) -> Answer:
        """The text before the first stop token, special tokens kept (a chat-template token written inside an answer
        is a leak for validation to see, not to be erased); `Failed("unfinished")` when max_new_tokens came first."""
        end = next((i for i, t in enumerate(ids) if t in self.stop_ids), None)
        if end is None:
            return Failed("unfinished")  # cut off mid-sentence or mid-list: no wording check can tell, the stop token does
        return self.tokenizer.decode(ids[:end], skip_special_tokens=False).strip()


def stop_tokens(*ids) -> set[int]:
    """Token ids from a mix of ints, lists of ints and Nones (generation_config.eos_token_id may be any of them)."""
    out: set[int] = set()
    for i in ids:
        if isinstance(i, int):
            out.add(i)
        elif isinstance(i, (list, tuple)):
            out |= stop_tokens(*i)
    return out


# --- openai-compatible endpoints -----------------------------------------------------------------

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}

# Query parameters that carry a secret (?key=, ?api-key=, ?token=, ?sig=...): redacted wherever a URL is shown.
SECRET_PARAM = re.compile(r"key|token|secret|passw|auth|sig|credential", re.IGNORECASE)


def redact_url(url: str) -> str:
    """`url` with its user:password@ and secret query values replaced by ***; unchanged when it has none."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<a URL that cannot be parsed>"
    netloc, query = parts.netloc, parts.query
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    if any(SECRET_PARAM.search(k) for k, _ in pairs):
        query = "&".join(f"{urllib.parse.quote(k)}=***" if SECRET_PARAM.search(k) else urllib.parse.urlencode({k: v}) for k, v in pairs)
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def sends_secret_in_clear(settings: OpenAISettings) -> bool:
    """Whether a key or credentials would cross a network unencrypted: plain http:// to a host that is not this machine."""
    parts = urllib.parse.urlsplit(settings.base_url)
    secret = settings.api_key_env is not None or parts.username is not None or redact_url(settings.base_url) != settings.base_url
    return secret and parts.scheme == "http" and not is_loopback(parts.hostname)


def concurrency_share(total: int, workers: int) -> int:
    """Requests one worker keeps in flight so that `workers` of them together stay within `total` (at least one each)."""
    return max(1, total // max(1, workers))


def check_transport(settings: OpenAISettings) -> None:
    """Refuse to send a key in clear text unless the settings allow it; raises ValueError."""
    if sends_secret_in_clear(settings) and not settings.allow_plain_http_key:
        raise ValueError(f"base_url: {redact_url(settings.base_url)} is plain http:// to another machine, and the key would "
                         f"cross the network unencrypted: use https://, or set allow_plain_http_key: true on a trusted network")  # fmt: skip


class _RedactURLs(logging.Filter):
    """httpx logs every request's URL at INFO; secrets in its query must not reach any log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact_url(str(a)) if type(a).__name__ == "URL" else a for a in record.args)
        return True


_REDACT_URLS = _RedactURLs()


def _connection(settings: OpenAISettings) -> tuple[Callable[[str], str], object, dict]:
    """URLs of the endpoint's routes, without user:password (httpx would log them); the basic auth they become; the headers."""
    import httpx

    logging.getLogger("httpx").addFilter(_REDACT_URLS)  # a no-op when it is already there
    parts = urllib.parse.urlsplit(settings.base_url)
    auth = None
    if parts.username is not None:
        auth = httpx.BasicAuth(urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or ""))
        parts = parts._replace(netloc=parts.netloc.rpartition("@")[2])

    def route(name: str) -> str:  # a query in base_url (?api-version=...) stays after the route
        return urllib.parse.urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/" + name))

    key = api_key(settings)
    return route, auth, ({"Authorization": f"Bearer {key}"} if key else {})


class OpenAIGenerator:
    """Chat completions over HTTP with bounded concurrency; retries honour Retry-After (capped), then back off exponentially."""

    def __init__(self, settings: OpenAISettings, vision: bool, workers: int = 1):
        route, self._auth, self._headers = _connection(settings)
        check_transport(settings)
        self.settings, self.model_name = settings, settings.model
        self.where = redact_url(settings.base_url)  # how the endpoint is named in errors and logs
        self.url = route("chat/completions")
        self.concurrency = concurrency_share(settings.max_concurrency, workers)
        if workers > settings.max_concurrency:
            log.warning("%s: %d workers share max_concurrency=%d; each keeps one request in flight, %d in all",
                        self.where, workers, settings.max_concurrency, workers)  # fmt: skip

    def generate(self, requests: list[ChatRequest]) -> list[Answer]:
        return run_coroutine(self._all(requests))

    async def _all(self, requests: list[ChatRequest]) -> list[Answer]:
        """`concurrency` workers, each on its own keep-alive connection, take requests in turn.

        One client per connection rather than one shared pool: httpcore's pool scans every
        connection for every request, which at 64 connections costs more CPU than the requests.
        A request that gives up stops the taking of new ones; once those in flight end, it is
        judged: if the server answered others after its trouble began, the trouble is that
        request's (its pair fails) and the rest go on; else the server is: BackendError.
        """
        import httpx

        s = self.settings
        answers: list[Answer | None] = [None] * len(requests)
        todo = collections.deque(enumerate(requests))
        tls = httpx.create_ssl_context()  # built once: each client would otherwise load the CA store again (~25 ms)
        self._last_answer = float("-inf")  # when a request of this call last got an answer (monotonic)

        while todo:
            gave_up: dict[int, _GaveUp] = {}

            async def worker() -> None:
                limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
                async with httpx.AsyncClient(headers=self._headers, auth=self._auth, timeout=s.timeout_s, limits=limits, verify=tls) as client:
                    while todo and not gave_up:
                        i, req = todo.popleft()
                        answer = await self._request(client, req)
                        if isinstance(answer, _GaveUp):
                            gave_up[i] = answer
                        else:
                            answers[i] = answer

            await asyncio.gather(*(worker() for _ in range(min(self.concurrency, len(todo)))))
            for i, g in sorted(gave_up.items()):
                if g.trouble_since >= self._last_answer:
                    raise BackendError(f"{self.where}: gave up after {s.max_retries + 1} attempts, last: {g.last}")
                log.warning("%s: gave up on one request after %d attempts (last: %s) while others were answered; its pair fails",
                            self.where, s.max_retries + 1, g.last)  # fmt: skip
                answers[i] = Failed("server_gave_up")
        return answers  # type: ignore[return-value]

    async def _request(self, client, req: ChatRequest) -> Answer | _GaveUp:
        """One request, retried as is (same seed: the same answer) on transient trouble."""
        import httpx

        s = self.settings
        try:  # strict UTF-8: a prompt with a lone surrogate cannot be sent, and fails only its own pair
            body = json.dumps(chat_payload(s, req), ensure_ascii=False).encode("utf-8")
        except PROMPT_ERRORS as e:
            log.warning("%s: a request that cannot be sent (its pair is rejected as bad_prompt): %s: %s", self.where, type(e).__name__, e)
            return Failed("bad_prompt")
        last, trouble_since = "", None
        for attempt in range(s.max_retries + 1):
            wait = s.backoff_s * (2**attempt) * (0.5 + random.random() / 2)
            try:  # the deadline covers the whole request: httpx's own timeout restarts with every byte read
                r = await asyncio.wait_for(client.post(self.url, content=body, headers={"Content-Type": "application/json"}), s.timeout_s)
            except (httpx.TimeoutException, asyncio.TimeoutError):
                last = f"no complete answer within timeout_s={s.timeout_s:g}"
            except httpx.TransportError as e:
                last = f"connection error ({type(e).__name__})"
            else:
                if r.status_code == 200:
                    answer = _answer_of(r)
                    if answer is not None:
                        self._last_answer = time.monotonic()
                        return answer
                    last = "malformed response"  # a cut-off body is usually transient: ask again
                elif r.status_code in (401, 403):
                    raise BackendError(f"{self.where} refused the API key{_key_source(s)} (HTTP {r.status_code})")
                elif r.status_code not in RETRY_STATUS:
                    return Failed(f"http_{r.status_code}")
                else:
                    last = f"HTTP {r.status_code}"
                    wait = _retry_after(r.headers.get("retry-after"), wait, s.max_retry_after_s)
            trouble_since = time.monotonic() if trouble_since is None else trouble_since
            if attempt < s.max_retries:
                log.info("%s: %s, retrying in %.1fs", self.where, last, wait)
                await asyncio.sleep(wait)
        if last == "malformed response":  # the server answers, but not in the expected shape: this request fails
            return Failed("malformed_response")
        return _GaveUp(trouble_since, last)


@dataclass(frozen=True)
class _GaveUp:
    """A request that stayed in transient trouble through all its retries; judged once the requests in flight end."""

    trouble_since: float  # monotonic time of its first failure
    last: str


def api_key(settings: OpenAISettings) -> str | None:
    if settings.api_key_env is None:
        return None
    key = os.environ.get(settings.api_key_env)
    if not key:
        raise ValueError(f"api_key_env: the environment variable {settings.api_key_env} is not set")
    return key


def _key_source(s: OpenAISettings) -> str:
    if s.api_key_env:
        return f" from ${s.api_key_env}"
    return " (the credentials in base_url)" if urllib.parse.urlsplit(s.base_url).username is not None else " (none was sent: set api_key_env)"


def _answer_of(response) -> Answer | None:
    """The completion's text; `Failed("unfinished")` when it stopped at max_tokens (finish_reason "length"), as the
    other backends do; None when the body is not a chat completion."""
    try:
        choice = response.json()["choices"][0]
        content = choice["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    if not isinstance(content, str):
        return None
    return Failed("unfinished") if choice.get("finish_reason") == "length" else content.strip()


def _retry_after(value: str | None, default: float, cap: float) -> float:
    """Retry-After as seconds or an HTTP date, at most `cap`; the default when absent or unreadable."""
    if not value:
        return default
    try:
        wait = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return default
        wait = when.timestamp() - time.time()
    return min(cap, max(0.0, wait)) if wait == wait else default  # NaN reads as absent


def check_endpoint(settings: OpenAISettings, listing: dict | None = None) -> None:
    """Reach the endpoint once before any work: its model listing, else one tiny request. Raises ValueError, one line.

    `listing` memoises the served models by base URL, so two steps on one server ask once.
    """
    import httpx

    route, auth, headers = _connection(settings)
    check_transport(settings)
    where = redact_url(settings.base_url)
    listing = {} if listing is None else listing
    timeout = min(settings.timeout_s, 30.0)
    try:
        with httpx.Client(headers=headers, auth=auth, timeout=timeout) as client:
            if settings.base_url not in listing:
                r = client.get(route("models"))
                _refused(r, settings, where)
                listing[settings.base_url] = _served_models(r)
            served = listing[settings.base_url]
            if served is not None:
                if settings.model not in served:
                    shown = ", ".join(sorted(served)[:10]) or "none"
                    raise ValueError(f"model: {where} does not serve {settings.model!r} (it serves: {shown})")
                return
            # no listing (some servers have none): one request of one token
            payload = {"model": settings.model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
            r = client.post(route("chat/completions"), json=payload)
            _refused(r, settings, where)
            if r.status_code not in (200, 429):  # 429: it is there, and busy
                raise ValueError(f"base_url: {where} answered a one-token request for {settings.model!r} with HTTP {r.status_code}")
    except httpx.TimeoutException:
        raise ValueError(f"base_url: {where} did not answer within {timeout:g}s") from None
    except httpx.TransportError as e:
        raise ValueError(f"base_url: {where} is unreachable ({type(e).__name__}: {str(e) or 'no detail'})") from None


def _refused(r, settings: OpenAISettings, where: str) -> None:
    if r.status_code in (401, 403):
        raise ValueError(f"api_key_env: {where} refused the API key{_key_source(settings)} (HTTP {r.status_code})")


def _served_models(r) -> set[str] | None:
    """The model names of a /models answer; None when the server has no readable listing."""
    if r.status_code != 200:
        return None
    try:
        return {m["id"] for m in r.json()["data"]}
    except (ValueError, KeyError, TypeError):
        return None


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

        def chat(part: list[ChatRequest]) -> list[Answer]:
            params = [SamplingParams(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens, seed=r.seed) for r in part]
            outputs = self.llm.chat([chat_messages(r, s.image_quality) for r in part], sampling_params=params, use_tqdm=False)
            return [_vllm_answer(o) for o in outputs]

        errors: list[BaseException] = []
        answers = isolate_failures(chat, list(requests), errors)  # vLLM refuses a whole call for one prompt past max_model_len
        raise_if_backend_at_fault(requests, errors)
        return answers


def _vllm_answer(output) -> Answer:
    """A vLLM RequestOutput's text; `Failed("unfinished")` when generation stopped at max_tokens."""
    if not output.outputs:
        return Failed("empty_output")
    first = output.outputs[0]
    return Failed("unfinished") if first.finish_reason == "length" else first.text.strip()
