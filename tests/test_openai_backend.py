"""The `openai` backend against a real HTTP server on 127.0.0.1: retries, timeouts, bad answers, the key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import webdataset as wds
import yaml
from openai_server import Fault, OpenAIServer, load_generators
from PIL import Image

from stages.annotation.backends import BackendError, ChatRequest, Failed, OpenAISettings, chat_payload, make_generator
from stages.annotation.validate import Bounds, check_description, parse_instructions

KEY_ENV = "MEGASYNTH_TEST_API_KEY"
KEY = "sk-test-7d1f0c2a9b8e4f65a3c1d0e9f8b7a6c5"


@pytest.fixture(scope="module")
def served(text_models):
    return load_generators({"describer": (str(text_models["describer"]), True), "instructor": (str(text_models["instructor"]), False)})


@pytest.fixture
def server(served, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    with OpenAIServer(served, api_key=KEY) as srv:
        yield srv


def client(server, **kw) -> object:
    settings = dict(backend="openai", model="instructor", base_url=server.base_url, api_key_env=KEY_ENV,
                    backoff_s=0.01, timeout_s=5, max_new_tokens=40)  # fmt: skip
    settings.update(kw)
    return make_generator(OpenAISettings(**settings), vision=False)


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
    server.inject(Fault("hang", hang_s=1.5))
    [answer] = client(server, timeout_s=0.5).generate([REQ])
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


def test_pipeline_with_the_openai_backend(server, pipeline_config, tmp_path):
    """The issue's bar: a run against a local endpoint completes, every triplet validated, rejects counted by reason."""
    cfg = yaml.safe_load(pipeline_config.read_text())
    common = {"backend": "openai", "base_url": server.base_url, "api_key_env": KEY_ENV, "max_concurrency": 4, "backoff_s": 0.05, "timeout_s": 30}
    cfg["annotate"]["describer"] = {**common, "model": "describer", "max_new_tokens": 120}
    cfg["annotate"]["instructor"] = {**common, "model": "instructor", "max_new_tokens": 100}
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

    # changing the instructor redoes annotate, but every description comes from the answer cache
    descriptions = {s["__key__"]: s["json"]["description"] for s in samples}
    server.state.log.clear()
    r2 = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(path), "--out", str(out), "--set", "annotate.instructor.temperature=0.9"],
                        capture_output=True, text=True, env=env, timeout=900)  # fmt: skip
    assert r2.returncode == 0, r2.stderr[-3000:]
    models = [e[3] for e in server.state.log]
    assert "instructor" in models and "describer" not in models
    again = list(wds.WebDataset(sorted(str(p) for p in (out / "triplets").glob("*.tar")), shardshuffle=False).decode())
    assert all(descriptions[s["__key__"]] == s["json"]["description"] for s in again if s["__key__"] in descriptions)

    # the key never reaches configs, logs, run folders or outputs
    assert KEY not in r.stdout + r.stderr + r2.stdout + r2.stderr
    for p in out.rglob("*"):
        if p.is_file():
            assert KEY.encode() not in p.read_bytes(), p
