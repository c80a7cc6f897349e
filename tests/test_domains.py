"""A team's own domain: configs/domains/products.yaml runs on a folder of product photos the test draws, and its
prompt files, demonstrations and validation settings are the ones the run used."""

from __future__ import annotations

import json
import random
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import yaml
from PIL import Image, ImageDraw

from pipeline import runner
from pipeline.config import load_config
from stages import annotations
from stages.annotate import AnnotateSettings, AnnotateStage, request_seed
from stages.annotation import prompts
from stages.annotation.backends import ChatRequest
from stages.annotation.cache import AnswerCache, request_key

DOMAIN = Path(__file__).resolve().parent.parent / "configs" / "domains" / "products.yaml"
COLOURS = {"red": (200, 40, 40), "blue": (40, 70, 200), "green": (40, 150, 60), "yellow": (230, 200, 40),
           "black": (30, 30, 30), "orange": (240, 130, 30)}  # fmt: skip


def draw_product(kind: str, rgb: tuple[int, int, int], rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (160, 160), (245, 245, 245))
    d = ImageDraw.Draw(img)
    dx, dy = rng.randint(-8, 8), rng.randint(-8, 8)
    if kind == "mug":
        d.rectangle((50 + dx, 50 + dy, 100 + dx, 120 + dy), fill=rgb)
        d.arc((88 + dx, 65 + dy, 125 + dx, 105 + dy), -90, 90, fill=rgb, width=8)
    elif kind == "tote bag":
        d.polygon([(40 + dx, 70 + dy), (120 + dx, 70 + dy), (130 + dx, 135 + dy), (30 + dx, 135 + dy)], fill=rgb)
        d.arc((55 + dx, 30 + dy, 105 + dx, 100 + dy), 180, 360, fill=(90, 70, 50), width=5)
    else:  # table lamp
        d.polygon([(55 + dx, 30 + dy), (105 + dx, 30 + dy), (120 + dx, 75 + dy), (40 + dx, 75 + dy)], fill=rgb)
        d.rectangle((77 + dx, 75 + dy, 83 + dx, 125 + dy), fill=(120, 120, 120))
        d.ellipse((55 + dx, 120 + dy, 105 + dx, 135 + dy), fill=(90, 90, 90))
    return img


def product_folder(folder: Path) -> Path:
    """Three kinds of product in six colours: a JPEG each, its listing title as a .txt, its sku in a .json."""
    folder.mkdir(parents=True)
    rng = random.Random(0)
    for i, (kind, (colour, rgb)) in enumerate((k, c) for k in ("mug", "tote bag", "table lamp") for c in COLOURS.items()):
        stem = folder / f"{i:03d}"
        draw_product(kind, rgb, rng).save(stem.with_suffix(".jpg"), quality=92)
        stem.with_suffix(".txt").write_text(f"a {colour} {kind} on a plain white background")
        stem.with_suffix(".json").write_text(json.dumps({"sku": f"SKU-{i:03d}"}))
    return folder


def test_a_domain_config_runs_with_its_own_prompts_and_demonstrations(pipeline_config, tmp_path):
    test = yaml.safe_load(pipeline_config.read_text())
    local = {  # the test models and a small mining setup; everything else comes from the domain config
        "extends": str(DOMAIN),
        "corpus": {"paths": [str(product_folder(tmp_path / "products"))]},
        "caption": {"captioner": test["annotate"]["describer"]},  # every product has its title: nothing is generated
        "embed": test["embed"],
        "mine": {"k": 6, "bands": test["mine"]["bands"], "queries_per_unit": 20, "pairs_per_query": 1, "hard_negatives": 2},
        "annotate": {step: test["annotate"][step] for step in ("describer", "instructor")} | {"retries": 0},
        "write": test["write"],
        "executor": test["executor"],
    }
    config = tmp_path / "run.yaml"  # in another folder: the domain's files still resolve against products.yaml
    config.write_text(yaml.safe_dump(local))
    cfg = load_config(config)
    settings = cfg.stage_settings("annotate")
    folder = DOMAIN.parent / "products"
    assert settings.describe_prompt == str(folder / "describe.txt") and settings.language == "en"
    assert settings.demonstrations_file == str(folder / "demonstrations.jsonl") and settings.demonstrations == 3
    describe, instruct = prompts.load_prompt(settings.describe_prompt), prompts.load_prompt(settings.instruct_prompt)
    pool = prompts.load_demonstrations(settings.demonstrations_file)

    out = tmp_path / "run"
    runner.run(cfg, out, progress=False)

    rows = [r for f in sorted((out / "annotations").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    print(f"\nproducts domain: {len(rows)} pairs annotated; {Counter(r['error'] or 'ok' for r in rows).most_common()}")
    assert rows and {(r["describe_prompt"], r["instruct_prompt"]) for r in rows} == {(describe.name, instruct.name)}
    assert describe.name.startswith("describe.txt@") and instruct.name.startswith("instruct.txt@")
    # The instruct requests the instructor answered were rendered from the domain's template and demonstrations:
    # rebuilt here from the files, their keys are in the run's answer cache.
    instructed = [r for r in rows if r["status"] == annotations.OK or (r["error"] or "").startswith("instruct.")]
    assert instructed, f"no pair reached the instructor: {[r['error'] for r in rows]}"
    keys = []
    for r in instructed:
        seed = request_seed(settings.seed, r["pair_id"], "instruct", 0)
        demos = prompts.draw_demonstrations(pool, settings.demonstrations, random.Random(seed))
        text = prompts.instruct_text(instruct, r["description"], demos, settings.instructions_per_pair)
        assert text.startswith("A shopper is looking at one product") and demos[0].description in text
        keys.append(request_key("instruct", settings.instructor.answer_fingerprint(), ChatRequest(text, (), seed)))
    assert set(AnswerCache(out / "cache").get_many(keys)) == set(keys)
    # what the run wrote says which prompt files made it
    assert any(r["status"] == annotations.OK for r in rows)
    with tarfile.open(next((out / "triplets").glob("triplets-*.tar"))) as tar:
        meta = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json") and "instructions" not in m.name]
    assert meta and {(m["prompt_version"]["describe"], m["prompt_version"]["instruct"]) for m in meta} == {(describe.name, instruct.name)}


def test_editing_a_domain_file_in_place_reruns_annotate(tmp_path):
    """A file's path is a setting but its text is not: the stage's fingerprint holds a digest of its bytes."""
    f = tmp_path / "describe.txt"
    f.write_text("Compare {query_caption} and {target_caption}.")
    stage = AnnotateStage(AnnotateSettings(describe_prompt=str(f)), {}, tmp_path / "annotations")
    before = stage.fingerprint_extra()
    f.write_text("Compare {query_caption} with {target_caption}.")
    assert stage.fingerprint_extra() != before
    assert AnnotateStage(AnnotateSettings(), {}, tmp_path / "annotations").fingerprint_extra() == {}  # packaged defaults: as before
