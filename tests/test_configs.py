"""Every shipped config loads: a renamed key fails here, not in a user's `make demo` or cluster run."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").rglob("*.yaml"))


def test_the_configs_are_found():
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "megapairs.yaml"} and len(CONFIGS) > 2


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1] if p.parent.name == "ablations" else p.parent)))
def test_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.embed.spaces and cfg.annotate.describer.model and cfg.annotate.instructor.model
