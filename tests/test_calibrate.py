"""`megasynth calibrate`: the band policy on literal scores, then on the test pipeline's neighbour lists."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import calibrate
from pipeline.calibrate import Shares, percentiles, shares, transfer
from pipeline.rundir import Ledger

SCORES = np.array([0.50, 0.60, 0.70, 0.80, 0.85, 0.90, 0.95, 0.97, 0.99, 1.00])


def test_shares_count_the_band_as_an_open_interval():
    s = shares(SCORES, (0.80, 0.96))
    assert (s.below, s.above) == (0.4, 0.3)  # 0.80 itself is below: mine keeps lo < score < hi
    assert s.kept == pytest.approx(0.3)


def test_a_band_transfers_to_a_space_with_another_scale_keeping_the_same_neighbours():
    other = SCORES * 0.5  # the same order, another scale
    band = transfer(shares(SCORES, (0.80, 0.96)), other)
    assert band == (0.41, 0.48)  # the shortest decimals between 0.40|0.425 and 0.475|0.485
    kept = (other > band[0]) & (other < band[1])
    assert kept.tolist() == ((SCORES > 0.80) & (SCORES < 0.96)).tolist()


def test_a_band_transfers_through_any_monotone_change_of_scale():
    rng = np.random.default_rng(0)
    ref = rng.uniform(0.3, 1.0, 1000)
    squashed = np.tanh(3 * ref) * 0.6  # a space whose scores crowd together
    band = transfer(shares(ref, (0.80, 0.96)), squashed)
    assert vars(shares(squashed, band)) == pytest.approx(vars(shares(ref, (0.80, 0.96))), abs=1e-3)


def test_empty_shares_put_the_edge_at_the_end_of_the_scale():
    assert transfer(Shares(below=0.0, kept=0.7, above=0.3), SCORES) == (-1.0, 0.96)
    assert transfer(Shares(below=0.4, kept=0.6, above=0.0), SCORES) == (0.82, 1.0)


def test_the_reference_band_is_kept_where_it_already_keeps_the_same_neighbours():
    assert transfer(shares(SCORES, (0.80, 0.96)), SCORES, prefer=(0.80, 0.96)) == (0.80, 0.96)
    assert transfer(shares(SCORES, (0.80, 0.96)), SCORES * 0.5, prefer=(0.80, 0.96)) == (0.41, 0.48)


def test_ties_move_an_edge_to_the_nearest_share_they_allow():
    tied = np.array([0.5, 0.7, 0.7, 0.7, 0.9])
    assert transfer(Shares(below=0.4, kept=0.4, above=0.2), tied) == (0.6, 0.8)  # 1 below, not 2: the three 0.7s go together


def test_a_band_that_keeps_nothing_cannot_be_placed():
    with pytest.raises(ValueError, match="keeps 0.0% of neighbours"):
        transfer(Shares(below=0.5, kept=0.0, above=0.5), SCORES)
    with pytest.raises(ValueError, match="no neighbour scores"):
        transfer(Shares(0.4, 0.3, 0.3), np.array([]))
    with pytest.raises(ValueError, match="no neighbour scores"):
        shares(np.array([]), (0.8, 0.96))


def test_percentiles_of_literal_scores():
    p = percentiles(np.arange(101) / 100, (1, 50, 99))
    assert p == pytest.approx({1: 0.01, 50: 0.5, 99: 0.99})


# --- on a run -------------------------------------------------------------------------------------


def test_neighbour_scores_are_the_lists_mine_reads_without_the_query_itself(local_run):
    scores, queries = calibrate.neighbour_scores(local_run)
    k = Ledger(local_run).stage_record("mine")["settings"]["k"]
    mined = Ledger(local_run).summary("mine")["input"]
    assert queries == mined > 0
    files = sorted((Ledger(local_run).source("search") / "neighbours").glob("*.parquet"))
    table = pq.read_table(files[0])
    for space, s in scores.items():
        assert len(s) == queries * k  # k + 1 kept per query, itself dropped (every list is full on this corpus)
        assert s.max() < 1.001  # cosine, from float16 vectors
        first = table[f"{space}.score"][0].as_py()
        assert first[0] == pytest.approx(1.0, abs=1e-3) and np.isin(np.asarray(first[1:], np.float32), s).all()

    # a cap on queries reads a uniform sample of them
    sampled, used = calibrate.neighbour_scores(local_run, max_queries=10)
    assert 0 < used < queries and all(len(v) == used * k for v in sampled.values())


def test_calibration_keeps_the_reference_share_in_every_space(local_run):
    cal = calibrate.calibration(local_run, reference="pattern", band=(0.88, 0.97))
    ref = cal["reference"]
    assert ref["space"] == "pattern" and ref["band"] == [0.88, 0.97]
    n = {sp: c["neighbours"] for sp, c in cal["spaces"].items()}
    for sp, c in cal["spaces"].items():
        assert list(c["percentiles"].values()) == sorted(c["percentiles"].values())
        got = c["transferred_band_shares"]
        assert got["kept"] == pytest.approx(ref["shares"]["kept"], abs=2 / n[sp] + 1e-9), sp  # ties and rounding aside
    assert cal["spaces"]["pattern"]["transferred_band_shares"]["kept"] == pytest.approx(ref["shares"]["kept"], abs=1e-9)
    bands = calibrate.mine_settings(local_run).bands
    assert {sp: tuple(c["run_band"]) for sp, c in cal["spaces"].items()} == {sp: tuple(b) for sp, b in bands.items()}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=300)


def test_calibrate_command(local_run):
    out = cli("calibrate", str(local_run), "--reference", "semantic", "--json")
    assert out.returncode == 0, out.stderr
    cal = json.loads(out.stdout)
    assert cal["reference"]["band"] == [0.65, 0.96] and set(cal["spaces"]) == {"semantic", "pattern", "caption"}

    out = cli("calibrate", str(local_run), "--band", "0.7", "0.9")
    assert out.returncode == 0, out.stderr
    assert "same-share band" in out.stdout and "mine:\n  bands:\n    caption: [" in out.stdout

    out = cli("calibrate", str(local_run), "--reference", "colour")
    assert out.returncode == 2 and "--reference colour: not a mined space" in out.stderr and "caption, pattern, semantic" in out.stderr
    out = cli("calibrate", str(local_run), "--band", "0.9", "0.8")
    assert out.returncode == 2 and "a band is LO HI" in out.stderr
    out = cli("calibrate", str(local_run / "nope"))
    assert out.returncode == 2 and "not a megasynth run folder" in out.stderr
