"""The `openai` backend against a real HTTP server on 127.0.0.1: retries, timeouts, bad answers, the key."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import webdataset as wds
import yaml
from openai_server import Fault, OpenAIServer, load_generators
from PIL import Image

from stages.annotation.backends import (
    BackendError, ChatRequest, Failed, OpenAISettings, _retry_after, chat_payload, concurrency_share, isolate_failures, make_generator,
    redact_url,
)  # fmt: skip
from stages.annotation.validate import Bounds, check_description, parse_instructions

KEY_ENV = "MEGASYNTH_TEST_API_KEY"
KEY = "sk-test-7d1f0c2a9b8e4f65a3c1d0e9f8b7a6c5"
PASSWORD = "pw-4c1e9a7f3b2d"  # basic auth in a base_url
QUERY_SECRET = "qs-8e2b6d1a9c3f"  # a signature in a base_url's query


@pytest.fixture(scope="module")
def served(text_models):
    return load_generators({"describer": (str(text_models["describer"]), True), "instructor": (str(text_models["instructor"]), False)})


@pytest.fixture
def server(served, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    with OpenAIServer(served, api_key=KEY, basic_auth=("megasynth", PASSWORD)) as srv:
        yield srv


def client(server, workers: int = 1, **kw) -> object:
    settings = dict(backend="openai", model="instructor", base_url=server.base_url, api_key_env=KEY_ENV,
                    backoff_s=0.01, timeout_s=5, max_new_tokens=40)  # fmt: skip
    settings.update(kw)
    return make_generator(OpenAISettings(**settings), vision=False, workers=workers)


REQ = ChatRequest("Description: the query image and the target image both show cats.\nInstructions:", (), seed=7)


def test_requests_carry_images_as_data_urls_and_the_seed():
    img = Image.new("RGB", (20, 10), (255, 0, 0))
    s = OpenAISettings(backend="openai", model="m", base_url="http://x/v1", max_new_tokens=12, temperature=0.5, top_p=0.8)
    payload = chat_payload(s, ChatRequest("describe", (img, img), seed=42))
    parts = payload["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["image_url", "image_url", "text"]
    assert parts[0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert (payload["seed"], payload["max_tokens"], payload["temperature"], payload["top_p"]) == (42, 12, 0.5, 0.8)
    assert chat_payload(s, ChatRequest("text only"))["messages"] == [{"role": "user", "content": "text only"}]


def test_an_answer_depends_on_its_seed_only(server):
    gen = client(server)
    a = gen.generate([REQ, ChatRequest(REQ.text, (), seed=8), REQ])
    assert a[0] == a[2] and all(isinstance(x, str) and x for x in a)


def test_transient_errors_are_retried_with_the_same_seed(server):
    server.inject(Fault("429", retry_after="0"), Fault("503"), Fault("500"), Fault("malformed"))
    answers = client(server, max_concurrency=1).generate([REQ, REQ])
    assert answers[0] == answers[1] and isinstance(answers[0], str)
    assert [e[1] for e in server.state.log] == [429, 503, 500, "malformed", 200, 200]
    assert {e[2] for e in server.state.log} == {REQ.seed}


def test_concurrency_is_bounded_and_used(server):
    server.inject(*[Fault("slow", hang_s=0.3)] * 3)  # the first three stay open while the rest queue behind them
    answers = client(server, max_concurrency=3).generate([ChatRequest(REQ.text, (), seed=i) for i in range(8)])
    assert all(isinstance(a, str) and a for a in answers)
    assert server.state.peak_in_flight == 3


def test_a_body_that_stays_malformed_fails_only_its_request(server):
    server.inject(*[Fault("malformed")] * 3)
    [answer] = client(server, max_retries=2).generate([REQ])
    assert isinstance(answer, Failed) and answer.reason == "malformed_response"


def test_retry_after_is_honoured(server):
    server.inject(Fault("429", retry_after="0.6"))
    t0 = time.time()
    client(server, backoff_s=0.0).generate([REQ])
    times = [e[0] for e in server.state.log]
    assert times[1] - times[0] >= 0.55 and time.time() - t0 >= 0.55


def test_a_request_past_its_timeout_is_retried(server):
    server.inject(Fault("hang", hang_s=4.0))
    [answer] = client(server, timeout_s=2.0).generate([REQ])  # room for one generation on a busy CPU
    assert isinstance(answer, str) and answer


def test_a_client_error_fails_only_its_request(server):
    server.inject(Fault("400"))
    answers = client(server, max_concurrency=1).generate([REQ, REQ])
    assert [a.reason for a in answers if isinstance(a, Failed)] == ["http_400"]


def test_giving_up_is_an_error_that_stops_the_unit(server):
    server.inject(*[Fault("503")] * 3)
    with pytest.raises(BackendError, match="gave up after 3 attempts, last: HTTP 503"):
        client(server, max_retries=2).generate([REQ])


def test_a_refused_key_names_the_variable_not_the_key(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-wrong-key-1234567890")
    with pytest.raises(BackendError) as e:
        client(server).generate([REQ])
    assert f"${KEY_ENV}" in str(e.value) and "sk-wrong" not in str(e.value) and KEY not in str(e.value)


def test_a_missing_key_variable_is_a_config_error(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ValueError, match=f"environment variable {KEY_ENV} is not set"):
        make_generator(OpenAISettings(backend="openai", model="m", base_url="http://x/v1", api_key_env=KEY_ENV), vision=False)


# --- hostile servers: endless Retry-After, trickled bodies, prompts that crash it ---------------------


def finishes_within(seconds: float, fn):
    """fn()'s result, or a test failure if it is still running after `seconds` (it is left behind, on a daemon thread)."""
    box: list = []
    t = threading.Thread(target=lambda: box.append(fn()), daemon=True)
    t.start()
    t.join(seconds)
    assert box, f"still running after {seconds}s"
    return box[0]


def test_retry_after_is_capped(server):
    server.inject(Fault("429", retry_after="100000"))
    [answer] = finishes_within(20, lambda: client(server, max_retry_after_s=0.3).generate([REQ]))
    times = [e[0] for e in server.state.log]
    assert isinstance(answer, str) and 0.25 <= times[1] - times[0] < 5
    assert _retry_after("Wed, 21 Oct 2099 07:28:00 GMT", 1.0, 60.0) == 60.0  # a date far ahead waits the cap
    assert _retry_after("soon", 1.5, 60.0) == _retry_after(None, 1.5, 60.0) == _retry_after("nan", 1.5, 60.0) == 1.5
    assert _retry_after("-3", 1.5, 60.0) == 0.0


def test_a_trickling_body_is_cut_off_at_the_deadline(server):
    """A byte every 50 ms never trips a per-read timeout; the whole-request deadline cuts it, and the retry answers."""
    server.inject(Fault("trickle", hang_s=0.05))  # a 2 kB body: ~100 s at that pace
    t0 = time.time()
    [answer] = client(server, timeout_s=2.0).generate([REQ])
    assert isinstance(answer, str) and "xxxx" not in answer
    assert server.state.log[0][1] == "trickle" and server.state.log[-1][1] == 200 and time.time() - t0 < 20


def test_concurrency_is_bounded_across_workers(server):
    """Two workers of one stage, max_concurrency=4 between them: never more than 4 requests in flight in all."""
    assert [concurrency_share(16, 3), concurrency_share(4, 2), concurrency_share(4, 8)] == [5, 2, 1]
    server.inject(*[Fault("slow", hang_s=0.4)] * 6)
    workers = [client(server, max_concurrency=4, workers=2) for _ in range(2)]
    results: list = [None, None]
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, workers[i].generate([ChatRequest(REQ.text, (), seed=s) for s in range(6)])))
               for i in range(2)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(isinstance(a, str) for r in results for a in r)
    assert server.state.peak_in_flight == 4


def test_the_annotate_stage_splits_an_endpoints_concurrency_between_its_workers(tmp_path):
    from stages.annotate import AnnotateSettings, AnnotateStage

    common = {"backend": "openai", "base_url": "http://127.0.0.1:9/v1", "max_concurrency": 16}
    settings = AnnotateSettings(describer={**common, "model": "d"}, instructor={**common, "model": "i", "max_concurrency": 3})
    stage = AnnotateStage(settings, {"cache": tmp_path / "cache"}, tmp_path / "out")
    stage.worker_count = 4
    stage.setup()
    assert (stage.describer.concurrency, stage.instructor.concurrency) == (4, 1)


def test_an_answer_cut_off_at_max_tokens_is_unfinished(server):
    """finish_reason "length": the text may read as whole, but the model had more to say; as the other backends do."""
    server.inject(Fault("length"))
    answers = client(server, max_concurrency=1).generate([REQ, REQ])
    assert answers[0] == Failed("unfinished") and isinstance(answers[1], str) and answers[1]


def test_a_prompt_that_cannot_be_sent_fails_only_its_request(server):
    bad = ChatRequest("Description: a caption with a lone surrogate \udc80 in it.\nInstructions:", (), seed=3)
    answers = client(server).generate([REQ, bad, REQ])
    assert isinstance(answers[0], str) and answers[0] == answers[2] and answers[1] == Failed("bad_prompt")


def test_a_prompt_that_crashes_the_server_fails_only_its_request(server):
    """HTTP 500 for one prompt every time while the others are answered: that prompt's pair, not the unit."""
    server.state.poison = "POISON"
    poison = ChatRequest("Description: POISON.\nInstructions:", (), seed=3)
    answers = client(server, max_concurrency=2, max_retries=2).generate([poison, *[ChatRequest(REQ.text, (), seed=s) for s in range(4)]])
    assert answers[0] == Failed("server_gave_up") and all(isinstance(a, str) for a in answers[1:])
    with pytest.raises(BackendError, match="gave up after 3 attempts, last: HTTP 500"):  # alone, it cannot tell: the unit stops
        client(server, max_retries=2).generate([poison])


def test_one_bad_prompt_is_isolated_by_halving_the_batch():
    calls = []

    def generate(batch: list[str]) -> list[str]:
        calls.append(len(batch))
        if "bad" in batch:
            raise ValueError("prompt too long")
        return [b.upper() for b in batch]

    errors: list = []
    answers = isolate_failures(generate, ["a", "b", "bad", "c", "d"], errors)
    assert answers == ["A", "B", Failed("bad_prompt"), "C", "D"] and len(errors) == 1
    assert calls == [5, 2, 3, 1, 2]


# --- credentials: redacted everywhere, never sent in clear, endpoints checked before any work -----------


def test_credentials_in_a_url_are_redacted():
    assert redact_url("http://bob:s3cret@h:8000/v1") == "http://***@h:8000/v1"
    assert redact_url("https://h/v1?api-key=abc&api-version=2024") == "https://h/v1?api-key=***&api-version=2024"
    assert redact_url("https://h:8000/v1/") == "https://h:8000/v1/"
    s = OpenAISettings(backend="openai", model="m", base_url="https://bob:s3cret@h/v1?token=zz")
    assert "s3cret" not in str(s.model_dump(mode="json")) + str(s.model_dump()) and "zz" not in str(s.model_dump())
    other = s.model_copy(update={"base_url": "https://ann:other@h/v1?token=yy"})
    assert other.answer_fingerprint() == s.answer_fingerprint()  # rotating a password keeps every cached answer


def test_a_key_is_not_sent_over_plain_http_to_another_machine(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)

    def gen(url: str, **kw):
        return make_generator(OpenAISettings(backend="openai", model="m", base_url=url, **kw), vision=False)

    for url, kw in (("http://10.1.2.3:8000/v1", {"api_key_env": KEY_ENV}), ("http://bob:pw@gpu-node-7:8000/v1", {}),
                    ("http://gpu-node-7:8000/v1?api-key=abc", {})):  # fmt: skip
        with pytest.raises(ValueError, match="plain http:// to another machine"):
            gen(url, **kw)
    gen("http://10.1.2.3:8000/v1", api_key_env=KEY_ENV, allow_plain_http_key=True)
    gen("https://10.1.2.3:8000/v1", api_key_env=KEY_ENV)
    gen("http://localhost:8000/v1", api_key_env=KEY_ENV)
    gen("http://[::1]:8000/v1", api_key_env=KEY_ENV)
    gen("http://10.1.2.3:8000/v1")  # no key, nothing to protect


def check_annotate(describer: dict, instructor: dict) -> None:
    from stages.annotate import AnnotateSettings, AnnotateStage

    AnnotateStage(AnnotateSettings(describer=describer, instructor=instructor), {}, Path("unused")).check()


def test_every_endpoint_is_reached_before_any_work(server, monkeypatch):
    ok = {"backend": "openai", "base_url": server.base_url, "api_key_env": KEY_ENV}
    check_annotate({**ok, "model": "describer"}, {**ok, "model": "instructor"})
    assert server.state.log == []  # the model listing, not a generation
    with pytest.raises(ValueError, match=r"^annotate.instructor.model: .* does not serve 'llama' \(it serves: describer, instructor\)$"):
        check_annotate({**ok, "model": "describer"}, {**ok, "model": "llama"})
    monkeypatch.setenv(KEY_ENV, "sk-wrong-key-1234567890")
    with pytest.raises(ValueError, match=rf"^annotate.describer.api_key_env: .* refused the API key from \${KEY_ENV} \(HTTP 401\)$"):
        check_annotate({**ok, "model": "describer"}, {**ok, "model": "instructor"})


def test_a_dead_endpoint_is_one_line_at_start(pipeline_config, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = yaml.safe_load(pipeline_config.read_text())
    cfg["annotate"]["describer"] = {"backend": "openai", "base_url": f"http://127.0.0.1:{port}/v1", "model": "describer"}
    path = tmp_path / "dead.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(path), "--out", str(out)], capture_output=True, text=True, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: annotate.describer.base_url: http://127.0.0.1:{port}/v1 is unreachable (ConnectError")
    assert not out.exists()  # nothing ran, nothing was written


def test_pipeline_with_the_openai_backend(server, pipeline_config, tmp_path):
    """The issue's bar: a run against a local endpoint completes, every triplet validated, rejects counted by reason."""
    cfg = yaml.safe_load(pipeline_config.read_text())
    common = {"backend": "openai", "max_concurrency": 4, "backoff_s": 0.05, "timeout_s": 30}
    with_password = server.base_url.replace("http://", f"http://megasynth:{PASSWORD}@")  # the describer logs in with a password
    cfg["annotate"]["describer"] = {**common, "base_url": with_password, "model": "describer", "max_new_tokens": 120}
    cfg["annotate"]["instructor"] = {**common, "base_url": f"{server.base_url}?sig={QUERY_SECRET}", "api_key_env": KEY_ENV,
                                     "model": "instructor", "max_new_tokens": 100}  # fmt: skip
    path = tmp_path / "openai.yaml"
    path.write_text(yaml.safe_dump(cfg))
    server.inject(Fault("429", retry_after="0.1"), Fault("503"), Fault("malformed"), Fault("refuse"), Fault("hang", hang_s=0.2))

    out = tmp_path / "run"
    env = {**os.environ, KEY_ENV: KEY, "MEGASYNTH_LOG": "DEBUG"}
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(path), "--out", str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]

    status = json.loads((out / "stats.json").read_text())["stages"]
    ann = status["annotate"]
    assert all(s["done"] for s in status.values())
    assert ann["output"] > 0 and ann["input"] == ann["output"] + sum(ann["rejected"].values())
    assert all(reason.split(".")[0] in ("describe", "instruct") for reason in ann["rejected"])

    shards = sorted(str(p) for p in (out / "triplets").glob("*.tar"))
    samples = list(wds.WebDataset(shards, shardshuffle=False).decode())
    assert len(samples) == status["write"]["output"] == ann["output"]
    settings = yaml.safe_load((out / "config.yaml").read_text())["annotate"]
    for s in samples:
        check_description(s["json"]["description"], Bounds(*settings["description_words"]))
        instructions = "\n".join(f"{i}. {t}" for i, t in enumerate(s["instructions.json"], 1))
        assert parse_instructions(instructions, 3, Bounds(*settings["instruction_words"])) == s["instructions.json"]
        assert s["json"]["models"]["describer"] == "describer"

    # another instructor in a folder of its own that reuses the first: annotate runs again, but every description
    # comes from the first run's answer cache (read there, never written there)
    descriptions = {s["__key__"]: s["json"]["description"] for s in samples}
    first_answers = sorted(p.name for p in (out / "cache" / "answers").iterdir())
    server.state.log.clear()
    out2 = tmp_path / "run2"
    r2 = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(path), "--out", str(out2), "--reuse", str(out),
                         "--set", "annotate.instructor.temperature=0.9"], capture_output=True, text=True, env=env, timeout=900)  # fmt: skip
    assert r2.returncode == 0, r2.stderr[-3000:]
    models = [e[3] for e in server.state.log]
    assert "instructor" in models and "describer" not in models
    assert sorted(p.name for p in (out / "cache" / "answers").iterdir()) == first_answers
    again = list(wds.WebDataset(sorted(str(p) for p in (out2 / "triplets").glob("*.tar")), shardshuffle=False).decode())
    assert again and all(descriptions[s["__key__"]] == s["json"]["description"] for s in again if s["__key__"] in descriptions)

    # the key, the password and the signature never reach the config copy, ledger, logs, card or outputs (httpx logs at DEBUG)
    assert (out / "triplets" / "README.md").is_file() and list((out / "_state").rglob("*.log"))
    assert "http://***@127.0.0.1" in (out / "config.yaml").read_text()
    for secret in (KEY, PASSWORD, QUERY_SECRET):
        assert secret not in r.stdout + r.stderr + r2.stdout + r2.stderr
        for p in [*out.rglob("*"), *out2.rglob("*")]:
            if p.is_file():
                assert secret.encode() not in p.read_bytes(), p
