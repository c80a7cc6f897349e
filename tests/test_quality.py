"""Pair truth and instruction faithfulness: the policies on literals, then a run's numbers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import jpeg_bytes

from pipeline import quality
from pipeline.quality import DUPLICATE, TRUE, UNKNOWN, UNRELATED, Change, changes, names_change, pair_truth
from pipeline.rundir import Ledger
from stages import annotations, catalog, pairs


def scene(family="f00001", variant="base", objects=(("circle", "red", 2),), background=None, layout="left",
          lighting="neutral", effect="none", copy=None) -> dict:  # fmt: skip
    """Attributes as the synthetic corpus writes them (see demo.corpus.attributes_of)."""
    return {
        "family": family, "variant": variant, "copy": copy,
        "background": background or {"kind": "solid", "colours": ["white"], "texture": None, "direction": None},
        "objects": [{"kind": k, "category": "shape", "colour": c, "count": n} for k, c, n in objects],
        "layout": layout, "lighting": lighting, "effect": effect, "style": "illustration",
    }  # fmt: skip


def stripes(a: str, b: str) -> dict:
    return {"kind": "stripes", "colours": [a, b], "texture": None, "direction": "vertical"}


# --- policies ---------------------------------------------------------------------------------


def test_family_variants_are_true_and_copies_are_duplicates():
    base = scene()
    assert pair_truth(base, scene(variant="lighting", lighting="warm")) == TRUE
    assert pair_truth(base, scene(copy={"kind": "near_duplicate", "of": "000000001", "transform": "crop"})) == DUPLICATE
    assert pair_truth(base, None) == UNKNOWN and pair_truth(None, base) == UNKNOWN


def test_other_families_are_true_only_when_they_differ_as_a_variant_would():
    base = scene()
    # one or two of the generator's variations apart: shared attributes, a true relation
    assert pair_truth(base, scene(family="f00002", lighting="dim")) == TRUE
    assert pair_truth(base, scene(family="f00002", lighting="dim", layout="grid")) == TRUE
    # three apart, or apart in what no variant changes (a group more, another effect): unrelated
    assert pair_truth(base, scene(family="f00002", lighting="dim", layout="grid", objects=(("star", "red", 2),))) == UNRELATED
    assert pair_truth(base, scene(family="f00002", objects=(("circle", "red", 2), ("star", "blue", 1)))) == UNRELATED
    assert pair_truth(base, scene(family="f00002", effect="blur")) == UNRELATED
    # the same scene drawn twice by chance
    assert pair_truth(base, scene(family="f00002")) == DUPLICATE


def test_changes_pair_groups_by_kind_and_name_only_the_new_value():
    query = scene(objects=(("circle", "red", 2), ("star", "blue", 1)), background=stripes("black", "yellow"))
    target = scene(objects=(("star", "blue", 1), ("circle", "green", 2)), background=stripes("black", "pink"))
    found = changes(query, target)
    # groups in another order are the same groups; the background's black is not new, its pink is
    assert found == [Change("object_colour", ("green",)), Change("background", ("pink",))]
    kind = changes(scene(), scene(objects=(("hexagon", "red", 3),)))
    assert kind == [Change("object_kind", ("hexagon", "hexagons")), Change("object_count", ("three", "3"))]
    assert changes(scene(), scene(layout="centre")) == [Change("layout", ("center", "centre", "middle"))]


def test_an_instruction_is_faithful_when_it_names_a_new_value():
    colour = changes(scene(), scene(objects=(("circle", "blue", 2),)))
    assert names_change("Find a picture like this one, but with blue circles.", colour)
    assert names_change("BLUE ones instead", colour)
    assert not names_change("Something with bluetooth speakers and red circles.", colour)  # words, not substrings
    kind = changes(scene(), scene(objects=(("cross", "red", 2),)))
    assert names_change("Two red crosses please.", kind)  # plural
    single = changes(scene(), scene(objects=(("circle", "red", 1),)))
    assert not names_change("Find a picture like this one.", single)  # "this one" is not a count
    assert names_change("Only a single red circle.", single)


def test_change_text_uses_the_generators_words():
    query = scene(objects=(("circle", "red", 2),))
    target = scene(objects=(("circle", "blue", 2),), lighting="warm", layout="row")
    assert quality.change_text(query, target) == (
        "The same picture, but with two blue circles instead of two red circles, in warm light"
        " and with the objects lined up in a horizontal row."
    )
    assert quality.change_text(query, scene(background=stripes("black", "pink"))) == "The same picture, but on black and pink stripes."
    assert quality.change_text(query, query) is None


# --- the catalog keeps the fields quality reads ---------------------------------------------------


def test_ingest_keeps_the_named_fields_as_json_in_meta(tmp_path):
    from stages.ingest import CorpusSettings, IngestSettings, IngestStage

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"key": ["a", "b"], "image": [jpeg_bytes(), jpeg_bytes()], "caption": ["x", "y"],
                             "uid": ["u1", None], "attributes": ['{"family": "f1"}', None], "other": [1, 2]}), path)  # fmt: skip
    stage = IngestStage(IngestSettings(corpus=CorpusSettings(paths=[str(path)], keep_fields=["uid", "attributes"])), {}, tmp_path / "cat")
    for unit in stage.plan()[0]:
        stage.process(unit)
    rows = {r["key"]: r for r in catalog.read(tmp_path / "cat", "p").to_pylist()}
    assert json.loads(rows["a"]["meta"]) == {"uid": "u1", "attributes": '{"family": "f1"}'}
    assert rows["b"]["meta"] is None  # nothing to keep: null, not "{}"


# --- a run's numbers ------------------------------------------------------------------------------


def test_summary_of_a_run(local_run):
    s = quality.summary(local_run)
    assert s is not None, "the test config keeps the corpus's attributes"
    mined = [r for u in pairs.units(local_run / "pairs") for r in pairs.read(local_run / "pairs", u)]
    everything = s["truth"]["all"]
    assert everything["pairs"] + everything["unknown"] == len(mined)
    assert abs(sum(everything[v] for v in (TRUE, DUPLICATE, UNRELATED)) - 1) < 1e-3
    spaces = {sc["space"] for r in mined for sc in r["spaces"]}
    assert set(s["truth"]["spaces"]) == spaces
    for space, shares in s["truth"]["spaces"].items():
        assert shares["pairs"] + shares["unknown"] == sum(any(sc["space"] == space for sc in r["spaces"]) for r in mined)
    f = s["faithfulness"]
    assert f["pairs"] > 0 and f["instructions"] >= f["pairs"] and 0 <= f["faithful"] <= 1

    cat = {r["id"]: quality.attributes(r["meta"]) for sh in catalog.shards(local_run / "catalog")
           for r in catalog.read(local_run / "catalog", sh, columns=["id", "meta"]).to_pylist()}  # fmt: skip
    # mining finds true relations many times more often than two images drawn at random are one
    scenes = [a for a in cat.values() if a is not None]
    drawn = [pair_truth(a, b) for i, a in enumerate(scenes) for b in scenes[i + 1 :]]
    assert everything[TRUE] > 5 * drawn.count(TRUE) / len(drawn)

    # recomputed from the files, the faithful share agrees
    hits = total = 0
    for u in annotations.units(local_run / "annotations"):
        for a in annotations.read(local_run / "annotations", u):
            q, t = cat.get(a["query_id"]), cat.get(a["target_id"])
            found = [c for c in changes(q, t) if c.terms] if pair_truth(q, t) == TRUE else []
            if found:
                hits += sum(names_change(i, found) for i in a["instructions"])
                total += len(a["instructions"])
    assert total == f["instructions"] and round(hits / total, 4) == f["faithful"]


def test_summary_follows_reused_stages_and_is_none_without_attributes(local_run, pipeline_config, tmp_path):
    from pipeline import runner
    from pipeline.config import load_config

    cfg = load_config(pipeline_config)
    reused = tmp_path / "reused"
    runner.run(cfg, reused, progress=False, reuse=[local_run])
    assert Ledger(reused).source("mine") == local_run.resolve() and not (reused / "pairs").exists()
    assert quality.summary(reused) == quality.summary(local_run)

    bare = tmp_path / "bare"
    shutil.copytree(local_run, bare, ignore=shutil.ignore_patterns("triplets", "embeddings", "cache"))
    for sh in catalog.shards(bare / "catalog"):
        path = catalog.catalog_file(bare / "catalog", sh)
        table = pq.read_table(path)
        table = table.set_column(table.schema.get_field_index("meta"), "meta", pa.nulls(table.num_rows, pa.string()))
        pq.write_table(table, path)
    assert quality.summary(bare) is None
