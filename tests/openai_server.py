"""An OpenAI-compatible chat-completions server on 127.0.0.1 for tests: the boundary the `openai` backend talks to.

It answers with real models (the tiny transformers models, through the project's own
transformers backend), lists them at /models, and can be told to misbehave for the next
requests: 429 with Retry-After, 5xx, a hang past the client's timeout, a body trickled a
byte at a time, malformed JSON, a refusal, a 400; or to fail every request whose prompt
holds a marker (a prompt that crashes the server).
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
import urllib.parse
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

from stages.annotation.backends import ChatRequest, Failed, TransformersSettings, make_generator

REFUSAL = "I'm sorry, but I can't help with that."


@dataclass
class Fault:
    kind: str  # "429", "503", "500", "400", "hang", "slow" (answers after hang_s), "trickle", "malformed", "refuse",
    # "length" (the answer's start, cut off at max_tokens: finish_reason "length")
    retry_after: str | None = None
    hang_s: float = 2.0  # "trickle": the pause between two bytes of the body


@dataclass
class ServerState:
    models: dict  # served name -> generator
    api_key: str | None
    basic_auth: tuple[str, str] | None = None  # user, password: accepted as well as the key
    poison: str | None = None  # a prompt holding this text gets HTTP 500, every time
    faults: deque = field(default_factory=deque)
    log: list = field(default_factory=list)  # (time, status, seed, model) per request
    prompts: list = field(default_factory=list)  # (model, prompt text) per chat request received: what a model was shown
    lock: threading.Lock = field(default_factory=threading.Lock)
    in_flight: int = 0
    peak_in_flight: int = 0
    budget: dict = field(default_factory=dict)  # served name -> answers left before it only answers 503 (a backend gone)


def load_generators(models: dict[str, tuple[str, bool]], temperature: float = 0.7) -> dict:
    """served name -> (model folder, is a vision model)."""
    return {
        name: make_generator(TransformersSettings(model=path, device="cpu", temperature=temperature, batch_size=1), vision)
        for name, (path, vision) in models.items()
    }


def _request_of(payload: dict) -> ChatRequest:
    content = payload["messages"][-1]["content"]
    if isinstance(content, str):
        return ChatRequest(content, (), int(payload.get("seed") or 0))
    images, text = [], ""
    for part in content:
        if part["type"] == "image_url":
            data = part["image_url"]["url"].split(",", 1)[1]
            images.append(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
        elif part["type"] == "text":
            text = part["text"]
    return ChatRequest(text, tuple(images), int(payload.get("seed") or 0))


def make_handler(state: ServerState):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output quiet
            pass

        def _send(self, status: int, body: bytes, headers: dict | None = None) -> None:
            try:
                self._send_head(status, len(body), headers)
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client stopped waiting (its deadline): nothing to tell it
                pass

        def _send_head(self, status: int, length: int, headers: dict | None = None) -> None:
            if getattr(self, "counted", False):  # done before the client can see the answer and send its next request
                with state.lock:
                    state.in_flight -= 1
                self.counted = False
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(length))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()

        def _authorised(self) -> bool:
            accepted = set()
            if state.api_key:
                accepted.add(f"Bearer {state.api_key}")
            if state.basic_auth:
                accepted.add("Basic " + base64.b64encode(":".join(state.basic_auth).encode()).decode())
            return not accepted or self.headers.get("Authorization") in accepted

        def do_GET(self):
            if not urllib.parse.urlsplit(self.path).path.endswith("/models"):
                return self._send(404, b'{"error": "not found"}')
            if not self._authorised():
                return self._send(401, b'{"error": {"message": "invalid api key"}}')
            self._send(200, json.dumps({"object": "list", "data": [{"id": m, "object": "model"} for m in state.models]}).encode())

        def do_POST(self):
            payload = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            seed = payload.get("seed")
            if not urllib.parse.urlsplit(self.path).path.endswith("/chat/completions"):
                return self._send(404, b'{"error": "not found"}')
            state.prompts.append((payload.get("model"), _request_of(payload).text))
            if not self._authorised():
                state.log.append((time.time(), 401, seed, payload.get("model")))
                return self._send(401, b'{"error": {"message": "invalid api key"}}')
            if state.poison and state.poison in json.dumps(payload["messages"], ensure_ascii=False):
                state.log.append((time.time(), 500, seed, payload.get("model")))
                return self._send(500, b'{"error": {"message": "the prompt crashed the server"}}')
            with state.lock:
                fault = state.faults.popleft() if state.faults else None
                state.in_flight += 1
                state.peak_in_flight = max(state.peak_in_flight, state.in_flight)
            self.counted = True
            self._answer(payload, seed, fault)

        def _answer(self, payload: dict, seed, fault: Fault | None) -> None:
            if fault is not None and fault.kind in ("429", "503", "500", "400"):
                state.log.append((time.time(), int(fault.kind), seed, payload.get("model")))
                headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
                return self._send(int(fault.kind), b'{"error": {"message": "injected"}}', headers)
            if fault is not None and fault.kind == "hang":
                state.log.append((time.time(), "hang", seed, payload.get("model")))
                time.sleep(fault.hang_s)
                return self._send(503, b"{}")
            if fault is not None and fault.kind == "slow":
                time.sleep(fault.hang_s)
            if fault is not None and fault.kind == "trickle":
                state.log.append((time.time(), "trickle", seed, payload.get("model")))
                return self._trickle(fault.hang_s)
            if fault is not None and fault.kind == "malformed":
                state.log.append((time.time(), "malformed", seed, payload.get("model")))
                return self._send(200, b'{"choices": [{"mess')
            model = state.models.get(payload.get("model"))
            if model is None:
                return self._send(404, json.dumps({"error": f"no model {payload.get('model')}"}).encode())
            with state.lock:
                left = state.budget.get(payload["model"])
                if left is not None:
                    state.budget[payload["model"]] = left - 1
            if left is not None and left <= 0:
                state.log.append((time.time(), 503, seed, payload.get("model")))
                return self._send(503, b'{"error": {"message": "gone"}}')
            if fault is not None and fault.kind == "refuse":
                text = REFUSAL
            else:
                with state.lock:  # one generation at a time: the tiny models run on the test's CPU
                    text = model.generate([_request_of(payload)])[0]
            finish = "stop"
            if fault is not None and fault.kind == "length" and isinstance(text, str):
                text, finish = text[: len(text) // 2], "length"
            if isinstance(text, Failed):  # the local model could not answer it: as a real server says so
                if text.reason != "unfinished":
                    state.log.append((time.time(), 400, seed, payload.get("model")))
                    return self._send(400, json.dumps({"error": {"message": text.reason}}).encode())
                text, finish = "", "length"  # it ran into max_tokens
            state.log.append((time.time(), 200, seed, payload.get("model")))
            body = {"id": "cmpl-test", "object": "chat.completion", "model": payload["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}]}  # fmt: skip
            self._send(200, json.dumps(body).encode())

        def _trickle(self, pause_s: float) -> None:
            """A well-formed answer sent a byte at a time, each byte in time for a per-read timeout."""
            body = json.dumps({"choices": [{"message": {"role": "assistant", "content": "x" * 2000}}]}).encode()
            self._send_head(200, len(body))
            try:
                for i in range(len(body)):
                    self.wfile.write(body[i : i + 1])
                    self.wfile.flush()
                    time.sleep(pause_s)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up on it
                pass

    return Handler


class OpenAIServer:
    """`with OpenAIServer(generators, api_key) as srv:` serves on srv.base_url until the block ends."""

    def __init__(self, models: dict, api_key: str | None = None, basic_auth: tuple[str, str] | None = None):
        self.state = ServerState(models=models, api_key=api_key, basic_auth=basic_auth)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(self.state))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def inject(self, *faults: Fault) -> None:
        self.state.faults.extend(faults)

    def __enter__(self) -> "OpenAIServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
