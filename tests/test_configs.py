"""Every shipped config loads: a renamed key fails here, not in a user's `make demo` or cluster run."""

from __future__ import annotations

from pathlib import Path

import pytest

import yaml

from pipeline.config import ConfigError, load_config
from pipeline.sweep import load_sweep

ROOT = Path(__file__).resolve().parent.parent / "configs"
FILES = sorted(ROOT.rglob("*.yaml"))
SWEEPS = [p for p in FILES if "variants" in (yaml.safe_load(p.read_text()) or {}) or "grid" in (yaml.safe_load(p.read_text()) or {})]
CONFIGS = [p for p in FILES if p not in SWEEPS]


def test_the_configs_are_found():
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "megapairs.yaml"}
    assert {str(p.relative_to(ROOT)) for p in SWEEPS} >= {"ablations/paper.yaml", "ablations/demo.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.embed.spaces and cfg.annotate.describer.model and cfg.annotate.instructor.model


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_sweep_loads(path, tmp_path):
    sweep = load_sweep(path, out=tmp_path)
    assert len(sweep.variants) >= 8 and len({v.out for v in sweep.variants}) == len(sweep.variants)


def test_files_a_config_names_are_relative_to_that_config(tmp_path, monkeypatch):
    """Prompt and demonstration files resolve against the config file that names them, through `extends` too."""
    from stages.annotation import prompts

    (tmp_path / "base" / "texts").mkdir(parents=True)
    (tmp_path / "base" / "texts" / "describe.txt").write_text("Compare {query_caption} and {target_caption}.")
    (tmp_path / "base" / "base.yaml").write_text("annotate:\n  describe_prompt: texts/describe.txt\n  instruct_prompt: instruct-v1\n")
    (tmp_path / "team" / "mine").mkdir(parents=True)
    (tmp_path / "team" / "mine" / "demos.jsonl").write_text('{"description": "Two mugs.", "instructions": ["a red mug"]}\n')
    (tmp_path / "team" / "mine" / "banned.txt").write_text("stock photo\n")
    (tmp_path / "team" / "run.yaml").write_text(
        "extends: ../base/base.yaml\nannotate:\n  demonstrations_file: mine/demos.jsonl\n  banned_phrases_file: ./mine/banned.txt\n"
    )
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    ann = load_config(Path("../team/run.yaml")).annotate
    assert ann.describe_prompt == str(tmp_path / "base" / "texts" / "describe.txt")
    assert ann.demonstrations_file == str(tmp_path / "team" / "mine" / "demos.jsonl")
    assert ann.banned_phrases_file == str(tmp_path / "team" / "mine" / "banned.txt")
    assert ann.instruct_prompt == "instruct-v1"  # a packaged prompt's name is not a path
    assert prompts.load_prompt(ann.describe_prompt).name.startswith("describe.txt@")
    # on the command line, a path is relative to where the command runs
    (tmp_path / "elsewhere" / "mine.txt").write_text("{query_caption} vs {target_caption}")
    ann = load_config(Path("../team/run.yaml"), ["annotate.describe_prompt=mine.txt"]).annotate
    assert ann.describe_prompt == str(tmp_path / "elsewhere" / "mine.txt")
    with pytest.raises(ConfigError, match=r"annotate.demonstrations_file: demonstrations file not found: .*team/nope.jsonl"):
        load_config(Path("../team/run.yaml"), patch=None, overrides=["annotate.demonstrations_file=../team/nope.jsonl"])


def test_switching_a_backend_is_one_override(caplog):
    demo = ROOT / "demo.yaml"
    with caplog.at_level("WARNING", logger="megasynth.config"):
        describer = load_config(demo, ["annotate.describer.backend=vllm"]).annotate.describer
    assert describer.backend == "vllm" and describer.model.endswith("assets/models/describer-tiny-llava")
    assert describer.max_new_tokens == 160  # what the new backend takes is kept
    assert "annotate.describer.backend: transformers -> vllm; dropped batch_size, device" in caplog.text
    server = ["annotate.instructor.backend=openai", "annotate.instructor.base_url=http://127.0.0.1:8000/v1"]
    instructor = load_config(demo, server).annotate.instructor
    assert instructor.backend == "openai" and instructor.max_new_tokens == 120
    # a sweep's variant and a config's `extends` switch the same way; without a config, the default model is kept
    assert load_config(demo, patch={"annotate": {"describer": {"backend": "vllm"}}}).annotate.describer.backend == "vllm"
    assert load_config(None, ["annotate.describer.backend=vllm"]).annotate.describer.model == "Qwen/Qwen2-VL-7B-Instruct"
    # a key the new backend does not take, set after the switch, is still an error
    with pytest.raises(ConfigError, match="annotate.describer.batch_size: unknown key"):
        load_config(demo, ["annotate.describer.backend=vllm", "annotate.describer.batch_size=8"])
    with pytest.raises(ConfigError, match="'foo' is not a backend"):
        load_config(demo, ["annotate.describer.backend=foo"])


def test_a_sweep_variants_files_resolve_next_to_the_sweep_file(tmp_path, monkeypatch):
    (tmp_path / "domain").mkdir()
    (tmp_path / "domain" / "describe.txt").write_text("Compare {query_caption} and {target_caption} in {word_num} words.")
    sweep = tmp_path / "domain" / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"base": str(ROOT / "demo.yaml"), "variants": {"mine": {"annotate": {"describe_prompt": "describe.txt"}}}}))
    monkeypatch.chdir(tmp_path)  # not where the sweep file is
    variant = load_sweep(sweep, out=tmp_path / "out").variants[0]
    assert variant.config.annotate.describe_prompt == str(tmp_path / "domain" / "describe.txt")


def test_relative_paths_are_made_absolute_on_the_driver(tmp_path, monkeypatch):
    """Workers of a cluster were started elsewhere: nothing relative may leave the driver."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "enc").mkdir(parents=True)
    cfg = load_config(ROOT / "demo.yaml", ["annotate.cache_dir=shared-cache", "embed.spaces.caption.model=models/enc"], corpus=["data/*.tar"])
    assert cfg.corpus.paths == [str(tmp_path / "data" / "*.tar")]
    assert cfg.annotate.cache_dir == str(tmp_path / "shared-cache") and cfg.embed.spaces["caption"].model == str(tmp_path / "models" / "enc")


def test_cli_help_reads_as_people_expect():
    """Flags are flags, choices are listed, usage names CONFIG and RUN_DIR, examples follow, --version works."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    runner = CliRunner()
    run = runner.invoke(app, ["run", "--help"], prog_name="megasynth").output
    assert "CONFIG" in run.splitlines()[0] and "<ray|local>" in run and "<ingest|caption|embed|select|search|mine|annotate|write>" in run
    assert "--replace  " in run and "<bool>" not in run and "Examples:\n    megasynth run configs/demo.yaml" in run
    status = runner.invoke(app, ["status", "--help"], prog_name="megasynth").output
    assert "RUN_DIR" in status.splitlines()[0] and "--json  machine-readable" in status
    version = runner.invoke(app, ["--version"], prog_name="megasynth")
    assert version.exit_code == 0 and version.output.startswith("megasynth ")
    bad = runner.invoke(app, ["run", "configs/demo.yaml", "--executor", "spark"], prog_name="megasynth")
    assert bad.exit_code == 2 and "spark" in bad.output
