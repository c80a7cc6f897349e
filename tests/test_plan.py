"""megasynth plan: sizes parse, estimates scale as the work does, and every figure names its source."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.plan import DESIGN, DESIGN_H200, QWEN2_VL_2B_SHAPE, estimate, format_plan, knn_rate, parse_count, plan_command

MEGAPAIRS = Path(__file__).resolve().parent.parent / "configs" / "megapairs.yaml"


def plan_of(tmp_path, images: int, *overrides: str, results: Path | None = None) -> dict:
    # mine with faiss, as these tests were written for; the torch-exact figures are checked by knn_rate below
    config = load_config(MEGAPAIRS, ["mine.backend=faiss", "mine.device=auto", *overrides])
    return estimate(config, images, results or tmp_path / "no-results", demo_triplets=tmp_path / "no-demo")


def by_what(plan: dict) -> dict[str, dict]:
    return {f"{e['stage']}: {e['what']}": e for e in plan["estimates"]}


@pytest.mark.parametrize("text, count", [("20M", 20_000_000), ("500k", 500_000), ("2000000", 2_000_000), ("1.5M", 1_500_000), ("2_000_000", 2_000_000), ("1B", 10**9)])
def test_image_counts_parse(text, count):
    assert parse_count(text) == count


@pytest.mark.parametrize("text", ["", "twenty", "20X", "0", "1.5", "-3", "1.2345k"])
def test_bad_image_counts_are_refused(text):
    with pytest.raises(ValueError, match="--images"):
        parse_count(text)


def test_estimates_scale_with_the_work_they_count(tmp_path):
    """Per image work doubles with the corpus; exact kNN of every image against every image quadruples;
    a fixed number of queries keeps annotation constant and kNN linear."""
    every = [by_what(plan_of(tmp_path, n, "mine.queries=null")) for n in (1_000_000, 2_000_000)]
    fixed = [by_what(plan_of(tmp_path, n, "mine.queries=100000")) for n in (1_000_000, 2_000_000)]
    ratio = lambda plans, key: plans[1][key]["value"] / plans[0][key]["value"]  # noqa: E731
    for key in ("ingest: decode every image (CPU)", "embed: semantic: embeddings on disk", "embed: pattern: image tower (facebook/dinov2-base)"):
        assert ratio(every, key) == pytest.approx(2)
    assert ratio(every, "mine: semantic: exact search (faiss)") == pytest.approx(4)
    assert ratio(fixed, "mine: semantic: exact search (faiss)") == pytest.approx(2)
    assert ratio(every, "annotate: describe (Qwen/Qwen2-VL-7B-Instruct)") == pytest.approx(2)
    assert ratio(fixed, "annotate: describe (Qwen/Qwen2-VL-7B-Instruct)") == pytest.approx(1)


def test_without_results_it_falls_back_to_the_design_table_and_says_so(tmp_path):
    plan = plan_of(tmp_path, 20_000_000)
    assert plan["results"] == {"embed": None, "mine": None, "annotate": None} and plan["device"] == "h200"
    e = by_what(plan)
    semantic = e["embed: semantic: image tower (openai/clip-vit-large-patch14)"]
    assert semantic["source"].startswith(DESIGN) and semantic["value"] == pytest.approx(20e6 / 2430 / 3600)
    assert e["embed: semantic: embeddings on disk"]["value"] == pytest.approx(20e6 * (768 * 2 + 8 + 60))
    assert e["mine: semantic: exact search (faiss)"]["value"] == pytest.approx(2 * 4.5e6 * 20e6 * 768 / (DESIGN_H200["knn-torch-tflops"].value * 1e12) / 3600)
    assert "torch" in e["mine: semantic: exact search (faiss)"]["caveat"]  # the DESIGN figure is for another backend: said
    caption = e["embed: caption: text tower (openai/clip-vit-large-patch14)"]
    assert caption["value"] is None and "bench.embed" in caption["source"]  # DESIGN has no text tower figure: no number
    assert "embed: caption: text tower (openai/clip-vit-large-patch14)" in plan["totals"]["not_estimated"]


def test_every_figure_names_its_source(tmp_path):
    plan = plan_of(tmp_path, 20_000_000)
    for e in plan["estimates"]:
        assert e["source"], e
        if e["value"] is not None:
            assert any(s in e["source"] for s in (DESIGN, ".json", "stages/knn", "measured now", "the config", "the sum")), e
    text = format_plan(plan)
    assert text.count("from: ") == len(plan["estimates"])


def test_a_measured_result_file_is_preferred(tmp_path):
    """Hand-written result files: fixtures for the planner's reading of them, not measurements."""
    results = tmp_path / "results"
    results.mkdir()
    embed = {"params": {"batch_size": 256, "dtype": "bfloat16"}, "results": [
        {"space": "semantic", "model": "openai/clip-vit-large-patch14", "dim": 768, "stage_images_per_s": 1000.0},
        {"space": "pattern", "model": "some/other-model", "dim": 1024, "stage_images_per_s": 99999.0},
        {"decoder": "pil", "threads": 1, "images_per_s": 200.0},
    ]}
    mine = {"results": [  # bench/mine.py's rows; an IVF row's "effective" rate must not stand for exact search
        {"kind": "knn", "backend": "faiss", "index": "Flat", "tflops_effective": 100.0},
        {"kind": "knn", "backend": "torch-exact", "index": "Flat", "base": "streamed from host", "tflops_effective": 300.0},
        {"kind": "knn", "backend": "faiss", "index": "IVF4096,Flat", "tflops_effective": 900.0},
    ]}
    (results / "embed-h200.json").write_text(json.dumps(embed))
    (results / "mine-h200.json").write_text(json.dumps(mine))
    e = by_what(plan_of(tmp_path, 1_000_000, results=results))

    semantic = e["embed: semantic: image tower (openai/clip-vit-large-patch14)"]
    assert semantic["value"] == pytest.approx(1e6 / 1000 / 3600) and "embed-h200.json" in semantic["source"]
    assert "batch_size 256 (config: 512)" in semantic["caveat"]
    pattern = e["embed: pattern: image tower (facebook/dinov2-base)"]  # measured for another model: not used
    assert pattern["value"] == pytest.approx(1e6 / 7440 / 3600) and pattern["source"].startswith(DESIGN)
    assert e["ingest: decode every image (CPU)"]["value"] == pytest.approx(1e6 / 200 / 3600)
    knn = e["mine: semantic: exact search (faiss)"]  # the config's backend, not the fastest one
    assert knn["value"] == pytest.approx(2 * 1e6 * 1e6 * 768 / 100e12 / 3600) and "mine-h200.json" in knn["source"]  # 4.5M queries capped at 1M images

    fig, caveat = knn_rate(("mine-h200.json", mine), "torch-exact", "h200")
    assert fig.value == 300.0 and "results[1].tflops_effective" in fig.source and not caveat


def test_written_jpeg_size_comes_from_the_demo_output_when_there(tmp_path):
    demo = tmp_path / "triplets"
    (demo / "images").mkdir(parents=True)
    with tarfile.open(demo / "images" / "00000.tar", "w") as tar:
        for name, size in (("a.jpg", 1000), ("b.jpg", 3000), ("a.json", 50)):
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, io.BytesIO(b"x" * size))
    config = load_config(MEGAPAIRS)
    (tmp_path / "config.yaml").write_text(f"write: {{image_side: {config.write.image_side}, jpeg_quality: {config.write.jpeg_quality}}}\n")
    plan = estimate(config, 1_000_000, tmp_path / "none", demo_triplets=demo)
    (write,) = [e for e in plan["estimates"] if e["stage"] == "write"]
    assert str(demo) in write["source"] and write["value"] == pytest.approx((2 * 2_000_000 + 1_000_000) * 2000)

    # JPEGs written at another size say nothing about this config's: measured afresh instead
    plan = estimate(load_config(MEGAPAIRS, ["write.image_side=256"]), 1_000_000, tmp_path / "none", demo_triplets=demo)
    (write,) = [e for e in plan["estimates"] if e["stage"] == "write"]
    assert str(demo) not in write["source"] and write["source"].startswith("measured now")


def test_plan_command_prints_text_or_json(tmp_path):
    text = plan_command(MEGAPAIRS, "20M", results_dir=tmp_path)
    assert "20,000,000 images" in text and "total:" in text
    data = json.loads(plan_command(MEGAPAIRS, "500k", device="h200", results_dir=tmp_path, as_json=True))
    assert data["images"] == 500_000 and data["totals"]["model_hours_unit"] == "GPU-hours"


def test_a_measured_describer_shape_is_preferred_to_design(tmp_path):
    """bench/annotate.py's run of the Qwen2-VL-2B shape stands for the config's describer, with its caveat."""
    results = tmp_path / "results"
    results.mkdir()
    label = f"{QWEN2_VL_2B_SHAPE} (random weights, LLaVA architecture)"
    annotate = {"results": [
        {"step": "describe", "backend": "plain generate", "model": label, "batch_size": 64, "pairs_per_s": 10.0},
        {"step": "describe", "backend": "transformers", "model": label, "batch_size": 64, "pairs_per_s": 50.0},
        {"step": "describe", "backend": "transformers", "model": label, "batch_size": 256, "pairs_per_s": 80.0},
        {"step": "describe", "backend": "openai", "model": "fixed answer on 127.0.0.1", "batch_size": None, "pairs_per_s": 900.0},
    ]}
    (results / "annotate-h200.json").write_text(json.dumps(annotate))
    config = load_config(MEGAPAIRS, ["mine.backend=faiss", "mine.device=auto"])
    e = by_what(estimate(config, 1_000_000, results, demo_triplets=tmp_path / "no-demo"))
    (describe,) = [v for k, v in e.items() if k.startswith("annotate: describe (")]
    assert config.annotate.describer.batch_size == 64  # configs/megapairs.yaml: the batch-64 row is the nearest
    pairs = e["annotate: pairs to annotate"]["value"]
    assert describe["value"] == pytest.approx(pairs / 50.0 / 3600)
    assert "annotate-h200.json" in describe["source"] and "Qwen2-VL-2B shape" in describe["caveat"]
    (instruct,) = [v for k, v in e.items() if k.startswith("annotate: instruct (")]  # no instructor measured: DESIGN's figure
    assert instruct["source"].startswith(DESIGN)
