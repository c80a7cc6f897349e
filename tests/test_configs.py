"""Every shipped config loads: a renamed key fails here, not in a user's `make demo` or cluster run."""

from __future__ import annotations

from pathlib import Path

import pytest

import yaml

from pipeline.config import load_config
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
