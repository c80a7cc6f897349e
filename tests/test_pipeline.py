"""The whole pipeline on a 200-image corpus, as a user runs it: both executors, resume, reruns, bad input."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import webdataset as wds
import yaml

from pipeline import runner
from pipeline.config import load_config
from pipeline.rundir import STAGE_NAMES, RunLock
from conftest import digest

STAGES = STAGE_NAMES


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=timeout)


def unit_mtimes(run: Path, stage: str) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in (run / "_state" / stage / "units").glob("*.json")}


def test_local_run_produces_readable_triplets(local_run):
    status = json.loads(cli("status", str(local_run), "--json").stdout)["stages"]
    assert list(status) == list(STAGES) and all(s["done"] for s in status.values())
    ingest, search, mine, annotate, write = (status[s] for s in ("ingest", "search", "mine", "annotate", "write"))
    assert ingest["input"] == 200 == ingest["output"] + sum(ingest["rejected"].values())
    assert 25 <= search["output"] <= 60 and mine["input"] == search["output"]  # about 40 queries: a share of the corpus
    assert mine["output"] == annotate["input"] > 0 and annotate["units"]["total"] > 1 and write["units"]["total"] > 3
    assert annotate["input"] == annotate["output"] + sum(annotate["rejected"].values())
    assert annotate["output"] > 0, f"no pair survived validation: {annotate['rejected']}"
    assert write["output"] == annotate["output"]

    shards = sorted(str(p) for p in (local_run / "triplets").glob("*.tar"))
    samples = list(wds.WebDataset(shards, shardshuffle=False).decode("rgb8"))
    assert len(samples) == write["output"]
    for s in samples:
        assert len(s["instructions.json"]) == 3 and all(isinstance(i, str) and i for i in s["instructions.json"])
        meta = s["json"]
        assert meta["spaces"] and all(0.0 < sp["score"] < 1.0 for sp in meta["spaces"])
        assert meta["query_key"] != meta["target_key"]
        assert "query" in meta["description"].lower() and "target" in meta["description"].lower()
        assert s["query.jpg"].shape[2] == 3 and max(s["query.jpg"].shape[:2]) <= 512  # smaller images are not upscaled

    index = [json.loads(line) for line in (local_run / "triplets" / "index.jsonl").read_text().splitlines()]
    assert len(index) == len(samples)
    assert all(list(r)[:4] == ["q_img", "q_text", "t_img", "hns"] and r["hns"][0] == r["q_img"] for r in index)  # released fields first
    card = (local_run / "triplets" / "README.md")
    assert card.exists() and "megasynth triplets" in card.read_text()
    assert not (local_run / "triplets" / ".index-parts").exists() and not (local_run / "_state" / "write" / "scratch").exists()


def test_rerun_does_no_work_and_a_changed_setting_redoes_only_downstream(local_run, pipeline_config, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(local_run, run)
    before = {s: unit_mtimes(run, s) for s in STAGES}
    runner.run(load_config(pipeline_config), run, progress=False)
    assert {s: unit_mtimes(run, s) for s in STAGES} == before

    # a finished variant is never replaced silently: the run says what it would replace, and changes nothing
    with pytest.raises(runner.ReplaceRefused, match=r"mine \(mine.hard_negatives: 4 -> 2\).*replace mine, annotate, write.*--reuse"):
        runner.run(load_config(pipeline_config, ["mine.hard_negatives=2"]), run, progress=False)
    assert {s: unit_mtimes(run, s) for s in STAGES} == before

    runner.run(load_config(pipeline_config, ["mine.hard_negatives=2"]), run, progress=False, replace=True)
    after = {s: unit_mtimes(run, s) for s in STAGES}
    assert all(after[s] == before[s] for s in ("ingest", "caption", "embed", "search"))  # no new kNN search for a pair setting
    for stage in ("mine", "annotate", "write"):
        assert all(after[stage][u] != before[stage].get(u) for u in after[stage]), stage
    sample = json.loads((run / "triplets" / "index.jsonl").read_text().splitlines()[0])
    assert len(sample["hns"]) <= 3


def test_redoing_an_upstream_stage_alone_leaves_the_stages_after_it_stale(local_run, pipeline_config, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(local_run, run)
    card = (run / "triplets" / "README.md").read_text()
    summary = runner.run(load_config(pipeline_config, ["ingest.min_side=17"]), run, only="ingest", progress=False, replace=True)
    assert summary["ingest"]["done"] and not summary["ingest"]["stale"]
    assert all(summary[s]["stale"] and not summary[s]["done"] for s in STAGE_NAMES[1:])
    assert (run / "triplets" / "README.md").read_text() == card  # the card still describes the triplets that exist
    status = cli("status", str(run))
    assert status.returncode == 0 and "stale" in status.stdout + status.stderr
    with pytest.raises(runner.StageOrderError, match="needs caption done"):
        runner.run(load_config(pipeline_config, ["ingest.min_side=17"]), run, only="mine", progress=False)


def test_killed_run_resumes_to_the_same_bytes(local_run, pipeline_config, tmp_path):
    """Killed under the Ray executor's embedded cluster (what `make demo` runs), resumed in-process: the bytes of the
    local run, so both executors write the same bytes too."""
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(pipeline_config), "--out", str(out), "--quiet",
                             "--executor", "ray"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 400
    while time.time() < deadline and not list((out / "_state" / "annotate" / "units").glob("*.json")):
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed mid-stage"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "_state" / "write").exists()

    done = cli("run", str(pipeline_config), "--out", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    assert digest(out) == digest(local_run)
    assert not list(out.rglob(".tmp-*"))


def test_status_json_shape(local_run):
    st = json.loads(cli("status", str(local_run), "--json").stdout)
    for name in STAGES:
        s = st["stages"][name]
        assert {"done", "input", "output", "rejected", "seconds"} <= set(s)
        assert isinstance(s["rejected"], dict) and s["seconds"] >= 0


def test_second_run_on_the_same_folder_refuses(pipeline_config, tmp_path):
    out = tmp_path / "locked"
    with RunLock(out):
        r = cli("run", str(pipeline_config), "--out", str(out))
    assert r.returncode == 2 and "another megasynth run is using" in r.stderr
    assert not (out / "catalog").exists()


def write_config(tmp_path: Path, pipeline_config: Path, **changes) -> Path:
    cfg = yaml.safe_load(pipeline_config.read_text())
    for dotted, value in changes.items():
        node = cfg
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"corpus__paths": ["/no/such/corpus/*.tar"]}, "corpus path not found: /no/such/corpus/*.tar"),
        ({"embed__spaces__pattern__model": "/no/such/model"}, "embed.spaces.pattern.model: model folder /no/such/model does not exist"),
        ({"mine__k": 0}, "mine.k: Input should be greater than 0"),
        ({"mine__band": [0.9, 0.5]}, "mine.band: a band is [lo, hi]"),
        ({"mine__kk": 3}, "mine.kk: unknown key; allowed here: spaces, k, queries"),
        ({"executor__kind": "spark"}, "executor.kind: Input should be 'ray' or 'local'"),
    ],
)
def test_bad_input_is_one_clear_error_before_any_work(pipeline_config, tmp_path, changes, message):
    out = tmp_path / "out"
    r = cli("run", str(write_config(tmp_path, pipeline_config, **changes)), "--out", str(out))
    assert r.returncode == 2
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()


def test_empty_corpus_is_refused(pipeline_config, tmp_path):
    from conftest import write_tar

    empty = write_tar(tmp_path / "empty.tar", [])
    out = tmp_path / "out"
    r = cli("run", str(pipeline_config), "--corpus", str(empty), "--out", str(out))
    assert r.returncode == 2 and "corpus is empty" in r.stderr and not out.exists()


def test_sample_page_shows_random_triplets(local_run, tmp_path):
    r = cli("sample", str(local_run), "-n", "3", "--out", str(tmp_path / "s.html"))
    assert r.returncode == 0, r.stderr
    page = (tmp_path / "s.html").read_text()
    assert page.count('<div class="t">') == 3 and page.count('alt="query"') == page.count('alt="target"') == 3
    assert page.count('alt="hard negative"') == 12  # four per triplet, as thumbnails
    assert page.count("<li>") == 9
    assert 'class="toy"' in page and "Text from toy models" in page  # the test run's describer and instructor are toys


def test_sample_draws_uniformly_in_one_pass():
    from collections import Counter

    from pipeline.sample import _reservoir

    counts = Counter(x for seed in range(3000) for x in _reservoir(iter(range(100)), 5, random.Random(seed)))
    assert sum(counts.values()) == 3000 * 5 and len(_reservoir(iter(range(3)), 5, random.Random(0))) == 3
    assert min(counts.values()) > 0.6 * 150 and max(counts.values()) < 1.4 * 150  # each of 100 items expected 150 times


def test_reject_alarm_is_a_plain_function_of_counts():
    from collections import Counter

    from stages.base import Stats

    most = Stats(input=223, output=0, rejected=Counter({"describe.too_short": 150, "instruct.wrong_count": 73}))
    line = runner.reject_alarm("annotate", "Check the describer.", most, 0.5)
    assert line.startswith("annotate rejected 223 of the first 223 items (100%, more than executor.max_reject_share 0.5); "
                           "most: describe.too_short 150, instruct.wrong_count 73. Check the describer.")  # fmt: skip
    some = Stats(input=100, output=60, rejected=Counter({"undecodable": 40}))
    assert runner.reject_alarm("ingest", "hint", some, 0.5) is None
    assert runner.reject_alarm("mine", None, most, 0.5) is None and runner.reject_alarm("annotate", "hint", most, None) is None


def test_a_stage_that_rejects_most_of_its_input_stops_the_run_with_one_line(local_run, pipeline_config, corpus, tmp_path):
    """A describer that babbles loses every pair: the run says so and why, instead of ending with 0 triplets."""
    from demo import toy_models
    from pipeline.rundir import Ledger

    babbler = toy_models.build_describer(tmp_path / "untrained", str(corpus / "00000.tar"), steps=1)
    cfg = load_config(pipeline_config, [f"annotate.describer.model={babbler}", "annotate.retries=0"])
    with pytest.raises(runner.RejectAlarm, match=r"^annotate rejected (\d+) of the first \1 items \(100%.*most: describe\."):
        runner.run(cfg, tmp_path / "run", progress=False, reuse=(local_run,))
    assert Ledger(tmp_path / "run").summary("annotate")["failed"]["message"].startswith("annotate rejected")
    assert not (tmp_path / "run" / "triplets").exists()
