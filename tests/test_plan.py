"""megasynth plan: sizes parse, estimates scale as the work does, and every figure names its source."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.plan import (KNOWN_PARAMS, QWEN2_VL_2B_SHAPE, REFERENCE, estimate, format_plan, knn_rate, model_params, parse_count, plan_command,
                           reference_figures, unit_plan)
from pipeline.rundir import STAGE_NAMES

ROOT = Path(__file__).resolve().parent.parent
MEGAPAIRS = ROOT / "configs" / "megapairs.yaml"


def plan_of(tmp_path, images: int, *overrides: str, results: Path | None = None, gpus: int | None = None, cpus: int | None = None) -> dict:
    # mine with faiss, as these tests were written for; the torch-exact figures are checked by knn_rate below
    config = load_config(MEGAPAIRS, ["mine.backend=faiss", "mine.device=auto", *overrides])
    return estimate(config, images, results or tmp_path / "no-results", demo_triplets=tmp_path / "no-demo", gpus=gpus, cpus=cpus)


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


def test_without_results_it_falls_back_to_the_reference_figures_and_says_so(tmp_path):
    plan = plan_of(tmp_path, 20_000_000)
    assert plan["results"] == {"embed": None, "mine": None, "annotate": None} and plan["device"] == "h200"
    e = by_what(plan)
    semantic = e["embed: semantic: image tower (openai/clip-vit-large-patch14)"]
    assert semantic["source"].startswith(REFERENCE) and semantic["value"] == pytest.approx(20e6 / 2430 / 3600)
    assert e["embed: semantic: embeddings on disk"]["value"] == pytest.approx(20e6 * (768 * 2 + 8 + 60))
    assert e["mine: semantic: exact search (faiss)"]["value"] == pytest.approx(2 * 4.5e6 * 20e6 * 768 / (reference_figures()["knn-torch-tflops"].value * 1e12) / 3600)
    assert "torch" in e["mine: semantic: exact search (faiss)"]["caveat"]  # the reference figure is for another backend: said
    caption = e["embed: caption: text tower (openai/clip-vit-large-patch14)"]
    assert caption["value"] is None and "`megasynth bench embed`" in caption["source"]  # no text tower figure: no number, and the command to run
    assert "embed: caption: text tower (openai/clip-vit-large-patch14)" in plan["totals"]["not_estimated"]


def test_every_figure_names_its_source(tmp_path):
    plan = plan_of(tmp_path, 20_000_000)
    for e in plan["estimates"]:
        assert e["source"], e
        if e["value"] is not None:
            assert any(s in e["source"] for s in (REFERENCE, ".json", "stages/knn", "measured now", "the config", "the sum", "assumed")), e
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
    assert pattern["value"] == pytest.approx(1e6 / 7440 / 3600) and pattern["source"].startswith(REFERENCE)
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


def test_a_measured_describer_shape_is_preferred_to_the_reference(tmp_path):
    """bench/annotate.py's run of the Qwen2-VL-2B shape stands for the config's describer, scaled to it by cost."""
    results = tmp_path / "results"
    results.mkdir()
    label = f"{QWEN2_VL_2B_SHAPE} (random weights, LLaVA architecture)"
    annotate = {"params": {"prompt_tokens_mean": 650.0, "max_new_tokens": 128}, "results": [
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
    assert config.annotate.describer.max_new_tokens == 192
    pairs = e["annotate: pairs to annotate"]["value"]
    rate = 50.0 * (2_208_985_600 / 8_291_375_616) * ((650 + 128) / (650 + 192))  # the 7B costs more per token, and writes more tokens
    assert describe["value"] == pytest.approx(pairs / rate / 3600)
    assert "annotate-h200.json" in describe["source"] and "scaled from Qwen2-VL-2B-Instruct by params 2.21B/8.29B" in describe["source"]
    assert "tokens 778/842" in describe["source"] and "Qwen2-VL-2B" in describe["caveat"]
    (instruct,) = [v for k, v in e.items() if k.startswith("annotate: instruct (")]  # no instructor measured: the reference figure
    assert instruct["source"].startswith(REFERENCE)


def test_the_reference_describer_rate_is_scaled_to_the_config_model(tmp_path):
    """The notes measured a 2B shape at 612 + 128 tokens; the config's 7B writing 192 new tokens is costed by parameters x tokens."""
    e = by_what(plan_of(tmp_path, 20_000_000))
    describe, instruct = e["annotate: describe (Qwen/Qwen2-VL-7B-Instruct)"], e["annotate: instruct (meta-llama/Meta-Llama-3-8B-Instruct)"]
    rate = 18.4 * (2_208_985_600 / 8_291_375_616) * ((612 + 128) / (612 + 192))
    assert describe["value"] == pytest.approx(9_000_000 / rate / 3600)
    assert describe["source"].startswith(REFERENCE) and "scaled from Qwen2-VL-2B-Instruct by params 2.21B/8.29B" in describe["source"]
    assert instruct["value"] == pytest.approx(9_000_000 / (28 * (512 + 96) / (512 + 160)) / 3600)  # same parameters, more new tokens
    assert "params 8.03B/8.03B" in instruct["source"] and "tokens 608/672" in instruct["source"]

    # a model whose size nothing records is not guessed at
    e = by_what(plan_of(tmp_path, 20_000_000, "annotate.describer.model=someone/mystery-vlm"))
    mystery = e["annotate: describe (someone/mystery-vlm)"]
    assert mystery["value"] is None and "KNOWN_PARAMS" in mystery["source"] and "`megasynth bench annotate`" in mystery["source"]


def test_known_parameter_counts_match_a_count_from_the_model_config(tmp_path):
    """A model folder is counted from its config.json on the meta device; the table agrees for the models configs/ name."""
    from transformers import LlamaConfig, Qwen2VLConfig

    llama = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                        vocab_size=128256, tie_word_embeddings=False, architectures=["LlamaForCausalLM"])  # Meta-Llama-3-8B's published config
    vision = dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, hidden_size=3584)
    qwen = Qwen2VLConfig(text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                          vocab_size=152064, tie_word_embeddings=False),
                         vision_config=vision, tie_word_embeddings=False, architectures=["Qwen2VLForConditionalGeneration"])  # Qwen2-VL-7B's  # fmt: skip
    for config, name in ((llama, "meta-llama/Meta-Llama-3-8B-Instruct"), (qwen, "Qwen/Qwen2-VL-7B-Instruct")):
        folder = tmp_path / name.split("/")[-1]
        config.save_pretrained(folder)
        assert not list(folder.glob("*.safetensors"))  # a config alone: nothing to load
        counted, source = model_params(str(folder))
        assert counted == KNOWN_PARAMS[name] and source.endswith("config.json")
    assert model_params("qwen2-vl-7b-instruct") == (KNOWN_PARAMS["Qwen/Qwen2-VL-7B-Instruct"], "pipeline/plan.py: KNOWN_PARAMS")
    assert model_params("someone/mystery-vlm") is None


def test_every_cited_file_is_in_the_repository(tmp_path):
    """Estimates cite files a reader can open: bench/results/*.json, stages/..., pipeline/plan.py; nothing kept elsewhere."""
    cited = set()
    for e in plan_of(tmp_path, 20_000_000)["estimates"]:
        cited |= set(re.findall(r"[\w./-]+\.(?:json|py|md|yaml)\b", e["source"]))
    assert {"bench/results/reference-h200.json", "pipeline/plan.py", "stages/knn/__init__.py"} <= cited
    for path in cited:
        assert (ROOT / path).is_file(), path
    about = json.loads((ROOT / "bench/results/reference-h200.json").read_text())["about"]
    assert "random weights" in about and "not measurements of this repository's code" in about


# --- units and workers -------------------------------------------------------------------------


def test_64_gpus_get_at_least_64_units_of_every_stage_at_20M_images():
    """configs/megapairs.yaml at its published scale: 64 workers of any stage have a unit each, the GPU stages several."""
    stages = {s.stage: s for s in unit_plan(load_config(MEGAPAIRS), 20_000_000, gpus=64, cpus=64 * 16)}
    assert list(stages) == list(STAGE_NAMES)
    for s in stages.values():
        for wave in s.waves:
            assert wave.units >= 64 or not wave.sized, (s.stage, wave)
    for name in ("caption", "embed", "search", "annotate"):  # megapairs.yaml names a captioner for images without captions
        assert stages[name].gpus == 1 and stages[name].workers == 64, name
        assert min(w.units for w in stages[name].waves) >= 2 * 64, name
    assert stages["ingest"].waves[0].units == 2_000  # img2dataset shards of 10,000 images
    assert stages["annotate"].waves[0].units == 900  # 9M pairs / annotate.pairs_per_unit
    assert stages["write"].workers == 64 * 16 and min(w.units for w in stages["write"].waves if w.sized) >= 64 * 16


def test_a_stage_with_fewer_units_than_workers_is_warned(tmp_path):
    plan = plan_of(tmp_path, 1_000_000, "mine.queries_per_unit=100000", gpus=64)
    assert plan["cluster"] == {"gpus": 64, "cpus": 1024, "cpus_assumed": True}
    search = next(s for s in plan["units"] if s["stage"] == "search")
    assert search["waves"][0]["units"] == 10 and search["workers"] == 64  # 1M queries (every image), 100,000 a unit
    assert any(w.startswith("search: 10 units (~100,000 queries) for 64 workers, 54 idle; for more units: mine.queries_per_unit") for w in plan["warnings"])
    text = format_plan(plan)
    assert "warning: search: 10 units" in text and "16 per GPU, assumed" in text

    # a GPU stage with no GPU to run on: said, not planned as if it could run
    plan = plan_of(tmp_path, 1_000_000, gpus=0, cpus=32)
    assert "embed: no worker fits: each needs 1 GPU + 8 CPUs" in plan["warnings"]


def test_units_are_the_ones_the_stages_cut(tmp_path):
    """The planner's counts from numbers alone equal what search, annotate and write plan from real files."""
    from stages import catalog
    from stages.annotate import AnnotateSettings, AnnotateStage
    from stages.search import SearchSettings, SearchStage
    from stages.write import WriteSettings, WriteStage

    cat = tmp_path / "catalog"
    cat.mkdir()
    for shard, n in (("00000", 2500), ("00001", 700), ("00002", 1800)):  # 5,000 images, shards of uneven size
        catalog.write(cat / f"{shard}.parquet", [{"id": f"{shard}/{k}", "shard": shard, "key": str(k), "status": "ok"} for k in range(n)])
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    for name, n in (("a", 1234), ("b", 10), ("c", 4000)):  # 5,244 pairs in files laid out by the stage above
        pq.write_table(pa.table({"pair_id": [str(i) for i in range(n)]}), pairs / f"{name}.parquet")

    config = load_config(MEGAPAIRS, ["mine.queries=2622", "mine.queries_per_unit=300", "mine.pairs_per_query=2",
                                     "annotate.pairs_per_unit=700", "write.triplets_per_unit=1000"])  # fmt: skip
    planned = {s.stage: [w.units for w in s.waves] for s in unit_plan(config, 5_000)}
    search = SearchStage(SearchSettings(queries=2622, queries_per_unit=300, seed=0), {"catalog": cat}, tmp_path / "neighbours")
    assert planned["search"] == [len(search._query_units())]
    annotate = AnnotateStage(AnnotateSettings(pairs_per_unit=700), {"pairs": pairs}, tmp_path / "annotations")
    assert planned["annotate"] == [len(annotate.plan()[0])] == [8]
    write = WriteStage(WriteSettings(triplets_per_unit=1000), {"annotations": pairs, "scratch": tmp_path / "scratch"}, tmp_path / "triplets")
    assert planned["write"][0] == len(write.plan()[0]) == 6


def test_plan_command_shows_units_and_workers():
    from typer.testing import CliRunner

    from pipeline.cli import app

    result = CliRunner().invoke(app, ["plan", str(MEGAPAIRS), "--images", "20M", "--gpus", "64"])
    assert result.exit_code == 0, result.output
    assert "  search    129 x ~35,000 queries" in result.output
    assert "64 workers of 1 GPU + 8 CPUs, 31.2 units each" in result.output  # embed: 2,000 shards
    assert "1,024 workers of 1 CPU" in result.output
    result = CliRunner().invoke(app, ["plan", str(MEGAPAIRS), "--images", "20M", "--gpus", "-1"])
    assert result.exit_code != 0


def test_bench_runs_from_a_checkout_and_shows_its_own_options(tmp_path):
    """The installed `megasynth` (cwd elsewhere, no PYTHONPATH) finds the checkout's bench/ and passes --help to its parser."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", "from pipeline.cli import main; main()", "bench", "mine", "--help"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "usage: megasynth bench mine" in out.stdout and "--backends" in out.stdout and "--no-scaling" in out.stdout

    result = CliRunner().invoke(app, ["bench", "embed", "--help"])
    assert result.exit_code == 0, result.output
    assert "--batch-size" in result.output and "--unique-images" in result.output and "--input-side" in result.output
    result = CliRunner().invoke(app, ["bench", "embed", "--no-such-option"])
    assert result.exit_code == 2 and "unrecognized arguments: --no-such-option" in result.output
