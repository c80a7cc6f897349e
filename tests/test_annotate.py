"""annotate: per-request sampling, the transformers backend, retries and rejections, the answer cache."""

from __future__ import annotations

import collections
import importlib.util
import itertools
import os
import shutil

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from conftest import captions_of
from stages import annotations, catalog, pairs
from stages.annotate import AnnotateSettings, AnnotateStage
from stages.annotation.backends import (
    BackendError, ChatRequest, Failed, OpenAISettings, PerRequestSampler, TransformersSettings, VLLMSettings, make_generator,
)  # fmt: skip
from stages.annotation.cache import AnswerCache, request_key
from stages.ingest import CorpusSettings, IngestSettings, IngestStage


def test_sampling_does_not_depend_on_the_batch():
    torch.manual_seed(0)
    scores = torch.randn(5, 40) * 3
    together = PerRequestSampler([11, 12, 13, 14, 15], 0.7, 0.9)(None, scores).argmax(1)
    alone = [PerRequestSampler([s], 0.7, 0.9)(None, scores[i : i + 1]).argmax(1).item() for i, s in enumerate([11, 12, 13, 14, 15])]
    assert together.tolist() == alone


def test_sampling_follows_temperature_and_top_p():
    scores = torch.tensor([[0.0, 1.0, 2.0, -10.0]])
    s = PerRequestSampler([0], 1.0, 1.0)
    freq = collections.Counter(int(s(None, scores).argmax()) for _ in range(6000))
    expected = torch.softmax(scores, 1)[0]
    assert all(abs(freq[i] / 6000 - expected[i].item()) < 0.03 for i in range(3))
    top = PerRequestSampler([0], 1.0, 0.6)  # the head reaching 0.6 is token 2 alone (p=0.665)
    assert {int(top(None, scores).argmax()) for _ in range(200)} == {2}
    assert PerRequestSampler([0], 0.0, 1.0)(None, scores) is scores  # greedy passes scores through


def test_transformers_backend_answers_each_request_as_if_alone(text_models):
    gen = make_generator(TransformersSettings(model=str(text_models["instructor"]), device="cpu", batch_size=3, max_new_tokens=100), vision=False)
    reqs = [ChatRequest(f"Description: the query image and the target image show {w}.\nInstructions:", (), seed=i)
            for i, w in enumerate(["cats", "two red circles on a long striped background", "a rocket", "coffee"])]  # fmt: skip
    batched = gen.generate(reqs)
    assert [gen.generate([r])[0] for r in reqs] == batched
    assert all(isinstance(a, str) for a in batched)


def test_cache_keys_and_round_trip(tmp_path):
    from PIL import Image

    r = ChatRequest("describe", (Image.new("RGB", (4, 4), "red"),), seed=1)
    g = {"backend": "transformers", "model": "m", "temperature": 0.7}
    k = request_key("describe", g, r)
    assert k != request_key("describe", g, ChatRequest("describe", (Image.new("RGB", (4, 4), "blue"),), seed=1))
    assert k != request_key("describe", g, ChatRequest("describe", r.images, seed=2))
    assert k != request_key("describe", {**g, "temperature": 0.5}, r)
    assert k != request_key("instruct", g, r)
    cache = AnswerCache(tmp_path / "cache")
    cache.put_many({k: "an answer"})
    assert AnswerCache(tmp_path / "cache").get_many([k, "f" * 64]) == {k: "an answer"}


@pytest.fixture(scope="module")
def pair_inputs(tmp_path_factory, corpus):
    tmp = tmp_path_factory.mktemp("ann")
    ingest = IngestStage(IngestSettings(corpus=CorpusSettings(paths=[str(corpus / "00000.tar")])), {}, tmp / "catalog")
    for u in ingest.plan()[0]:
        ingest.process(u)
    captions_of(tmp / "catalog")
    ids = catalog.read(tmp / "catalog", "00000", columns=["id"])["id"].to_pylist()
    rows = [{"pair_id": pairs.pair_id(ids[i], ids[i + 1]), "query_id": ids[i], "target_id": ids[i + 1],
             "spaces": [{"space": "caption", "score": 0.9}], "hard_negatives": []} for i in range(0, 16, 2)]  # fmt: skip
    rows.append({"pair_id": "gone", "query_id": "00000/nope", "target_id": ids[0], "spaces": [], "hard_negatives": []})
    (tmp / "pairs").mkdir()
    pairs.write(tmp / "pairs" / "queries-00000.parquet", rows)
    return tmp


def annotate(tmp, models, out, reuse=(), **kw) -> tuple:
    settings = AnnotateSettings(
        describer=TransformersSettings(model=str(models["describer"]), device="cpu", batch_size=8, max_new_tokens=120),
        instructor=TransformersSettings(model=str(models["instructor"]), device="cpu", batch_size=8, max_new_tokens=100),
        seed=0, **kw,
    )  # fmt: skip
    stage = AnnotateStage(settings, {"catalog": tmp / "catalog", "captions": tmp / "captions", "pairs": tmp / "pairs", "cache": tmp / f"cache-{out}"}, tmp / out)
    stage.reuse_runs = tuple(reuse)
    stage.setup()
    stats = stage.process(stage.plan()[0][0])
    return stats, annotations.read(tmp / out, "pairs-00000", ok_only=False)


def test_every_pair_is_kept_or_rejected_with_a_reason(pair_inputs, text_models):
    stats, rows = annotate(pair_inputs, text_models, "a1", retries=1)
    assert stats.input == 9 == len(rows) == stats.output + sum(stats.rejected.values())
    assert stats.output > 0  # else the checks of kept pairs below check nothing
    assert stats.rejected["image_not_in_catalog"] == 1
    for r in rows:
        if r["status"] == "ok":
            assert len(r["instructions"]) == 3 and r["description"] and 60 <= r["word_num"] <= 100
        else:
            assert r["error"] and r["instructions"] is None
    assert all(r["error"].split(".")[0] in ("describe", "instruct") for r in rows if r["status"] == "rejected" and r["pair_id"] != "gone")


def test_untrained_models_are_rejected_not_written(pair_inputs, corpus, tmp_path):
    """Random weights babble: every pair must end rejected with the validator's reason, after its retries."""
    from demo import toy_models

    models = {
        "describer": toy_models.build_describer(tmp_path / "d", str(corpus / "00000.tar"), steps=1),
        "instructor": toy_models.build_instructor(tmp_path / "i", str(corpus / "00000.tar"), steps=1),
    }
    stats, rows = annotate(pair_inputs, models, "a2", retries=1)
    assert stats.output == 0 and sum(stats.rejected.values()) == 9
    assert all(r["describe_attempts"] == 2 for r in rows if r["error"].startswith("describe."))


def test_a_rerun_answers_from_the_cache(pair_inputs, text_models):
    _, first = annotate(pair_inputs, text_models, "a3")
    folder = pair_inputs / "cache-a3"
    n = pq.read_table(pair_inputs / "a3" / "pairs-00000.parquet").num_rows
    entries = len(AnswerCache(folder))
    assert n == 9 and entries >= 8
    _, second = annotate(pair_inputs, text_models, "a3")
    assert second == first
    assert len(AnswerCache(folder)) == entries


def test_answers_of_reused_runs_are_read_there_and_never_written(pair_inputs, text_models, tmp_path):
    """`megasynth run --reuse OTHER`: a pair annotated there is not annotated again here."""
    _, first = annotate(pair_inputs, text_models, "a3")
    there = pair_inputs / "cache-a3" / "answers"
    files = {p.name: p.read_bytes() for p in there.iterdir()}
    other = tmp_path / "other-run"  # its config put its cache elsewhere: the reader follows it
    other.mkdir()
    (other / "config.yaml").write_text(yaml.safe_dump({"annotate": {"cache_dir": str(pair_inputs / "cache-a3")}}))
    _, again = annotate(pair_inputs, text_models, "a4", reuse=[other])
    assert again == first
    assert not list((pair_inputs / "cache-a4" / "answers").iterdir())  # nothing was generated here
    assert {p.name: p.read_bytes() for p in there.iterdir()} == files


def test_one_bad_prompt_fails_only_its_request_in_a_batch(text_models):
    """The tokenizer refuses a lone surrogate for the whole batch; the batch is split until the bad request is alone."""
    gen = make_generator(TransformersSettings(model=str(text_models["instructor"]), device="cpu", batch_size=4, max_new_tokens=20), vision=False)
    good = [ChatRequest(f"Description: the query image and the target image show {w}.\nInstructions:", (), seed=i)
            for i, w in enumerate(["cats", "a rocket", "coffee"])]  # fmt: skip
    bad = ChatRequest("Description: a caption with a lone surrogate \udc80.\nInstructions:", (), seed=9)
    answers = gen.generate([good[0], bad, good[1], good[2]])
    assert answers[1] == Failed("bad_prompt") and [answers[0], *answers[2:]] == gen.generate(good)
    with pytest.raises(TypeError):  # every request of the call refused: the backend's fault, not a prompt's
        gen.generate([bad, bad])


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed (pip install 'megasynth[vllm]')")
def test_vllm_backend_answers_by_seed(text_models):
    """Runs where vLLM imports (a GPU machine); the request building it shares with openai is tested everywhere."""
    from stages.annotation.backends import VLLMSettings

    gen = make_generator(VLLMSettings(backend="vllm", model=str(text_models["instructor"]), max_new_tokens=30), vision=False)
    reqs = [ChatRequest("Description: the query image and the target image show cats.\nInstructions:", (), seed=s) for s in (1, 2, 1)]
    answers = gen.generate(reqs)
    assert answers[0] == answers[2] and all(isinstance(a, str) for a in answers)


# --- the stage's flow: unreadable images, a backend lost mid-unit, what the answer cache keys on ---


def broken_copy(pair_inputs, tmp_path) -> set[str]:
    """The pair inputs with three images unreadable now (garbage, a short read, truncated bytes); their pair ids."""
    shutil.copytree(pair_inputs / "catalog", tmp_path / "catalog")
    shutil.copytree(pair_inputs / "pairs", tmp_path / "pairs")
    shutil.copytree(pair_inputs / "captions", tmp_path / "captions")
    cat = catalog.read(tmp_path / "catalog", "00000", ok_only=False).to_pylist()
    ids = catalog.read(tmp_path / "catalog", "00000", columns=["id"])["id"].to_pylist()
    by_id = {r["id"]: r for r in cat}
    garbage, short, truncated = by_id[ids[1]], by_id[ids[2]], by_id[ids[5]]  # pair 0's target, pair 1's query, pair 2's target
    garbage["offset"] = 0  # a tar header where the image was
    short["offset"] = os.path.getsize(short["path"])  # past the end of the file
    truncated["size"] //= 2
    catalog.write(catalog.catalog_file(tmp_path / "catalog", "00000"), cat)
    return {pairs.pair_id(ids[0], ids[1]), pairs.pair_id(ids[2], ids[3]), pairs.pair_id(ids[4], ids[5])}


def test_an_unreadable_image_rejects_its_pairs_and_the_unit_goes_on(pair_inputs, text_models, tmp_path):
    unreadable = broken_copy(pair_inputs, tmp_path)
    stats, rows = annotate(tmp_path, text_models, "out", retries=1, describe_chunk=2)
    assert stats.input == 9 == len(rows) == stats.output + sum(stats.rejected.values())
    assert stats.rejected["image_unreadable"] == 3 and stats.rejected["image_not_in_catalog"] == 1 and stats.output > 0
    for r in rows:
        if r["pair_id"] in unreadable:  # never sent to the describer
            assert r["status"] == "rejected" and r["error"] == "image_unreadable" and r["describe_attempts"] == 0
        else:
            assert r["error"] != "image_unreadable"


def test_a_backend_lost_mid_unit_costs_at_most_the_chunk_in_flight(pair_inputs, text_models, tmp_path, monkeypatch):
    """Chunks are described then instructed in turn, each cached as it ends: the rerun asks only for the rest."""
    from openai_server import OpenAIServer, load_generators

    served = load_generators({"describer": (str(text_models["describer"]), True), "instructor": (str(text_models["instructor"]), False)})
    common = {"backend": "openai", "max_concurrency": 1, "max_retries": 1, "backoff_s": 0.0, "timeout_s": 60}

    def run(srv, out: str):
        settings = AnnotateSettings(describer={**common, "base_url": srv.base_url, "model": "describer", "max_new_tokens": 120},
                                    instructor={**common, "base_url": srv.base_url, "model": "instructor", "max_new_tokens": 100},
                                    seed=0, retries=1, describe_chunk=3)  # fmt: skip
        stage = AnnotateStage(settings, {"catalog": pair_inputs / "catalog", "captions": pair_inputs / "captions", "pairs": pair_inputs / "pairs", "cache": tmp_path / f"cache-{out}"}, tmp_path / out)
        stage.setup()
        return stage.process(stage.plan()[0][0]), annotations.read(tmp_path / out, "pairs-00000", ok_only=False)

    with OpenAIServer(served) as srv:  # one server throughout: its address is part of the cache key
        _, whole = run(srv, "whole")
        asked = [m for _, status, _, m in srv.state.log if status == 200]
        blocks = [len(list(g)) for _, g in itertools.groupby(asked)]  # describe, instruct, describe, instruct, ... a pair per chunk
        assert len(blocks) >= 4 and asked[0] == "describer"

        srv.state.budget["instructor"] = blocks[1]  # the instructor is gone after the first chunk's answers
        with pytest.raises(BackendError):
            run(srv, "chunked")
        cached = len(AnswerCache(tmp_path / "cache-chunked"))
        assert cached == blocks[0] + blocks[1] + blocks[2]  # two chunks described, the first instructed

        srv.state.budget.clear()
        srv.state.log.clear()
        stats, rows = run(srv, "chunked")
        assert sum(1 for e in srv.state.log if e[1] == 200) == len(asked) - cached
    assert rows == whole and stats.output > 0


def test_settings_that_change_answers_change_the_cache_key():
    req = ChatRequest("Description: two cats.", (), seed=1)

    def key(settings) -> str:
        return request_key("instruct", settings.answer_fingerprint(), req)

    t = TransformersSettings(model="m")
    assert key(t) == key(t.model_copy(update={"batch_size": 3}))  # speed only: the same answers
    for changed in ({"dtype": "float16"}, {"cache_implementation": "static"}, {"device": "cpu"}, {"temperature": 0.5}):
        assert key(t.model_copy(update=changed)) != key(t), changed
    o = OpenAISettings(backend="openai", model="m", base_url="http://a:8000/v1")
    assert key(o) == key(o.model_copy(update={"base_url": "http://a:8000/v1/", "max_concurrency": 2, "timeout_s": 5.0}))
    assert key(o.model_copy(update={"base_url": "http://b:8000/v1"})) != key(o)
    assert key(o.model_copy(update={"image_quality": 70})) != key(o)
    v = VLLMSettings(backend="vllm", model="m")
    assert key(v) == key(v.model_copy(update={"gpu_memory_utilization": 0.9}))
    assert key(v.model_copy(update={"dtype": "float16"})) != key(v) and key(v.model_copy(update={"tensor_parallel_size": 2})) != key(v)
