"""The run folder's safety rules: outputs appear whole or not at all, and old outputs go only once the ledger says so."""

from __future__ import annotations

import errno

import pytest

from pipeline import rundir
from pipeline.executors import describe_error
from pipeline.rundir import Ledger
from stages.base import Stats, Unit, atomic_path


def test_atomic_path_puts_a_file_in_place_or_fails_loudly(tmp_path):
    with atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("whole")
    assert (tmp_path / "a.txt").read_text() == "whole"
    with pytest.raises(FileNotFoundError, match="never written"):
        with atomic_path(tmp_path / "b.txt"):
            pass  # a writer that wrote nothing must not pass as one that wrote an output
    with atomic_path(tmp_path / "c.txt", optional=True):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def finished_stage(tmp_path, fingerprint: str) -> tuple[Ledger, object]:
    ledger, output = Ledger(tmp_path), tmp_path / "out"
    ledger.begin_stage("s", {"fingerprint": fingerprint, "family": fingerprint, "scope": {}, "upstream": None, "settings": {}}, output, [[Unit("u")]])
    output.mkdir(exist_ok=True)
    (output / "u.bin").write_bytes(b"x")
    ledger.record("s", "u", fingerprint, Stats(input=1, output=1), 0.1)
    ledger.finish_stage("s")
    return ledger, output


def test_old_outputs_are_deleted_only_after_the_ledger_records_the_intent(tmp_path, monkeypatch):
    ledger, output = finished_stage(tmp_path, "old")
    assert ledger.summary("s")["done"]

    class Died(BaseException):
        pass

    def crash(*args, **kwargs):  # the process dies between the record and the deletion
        raise Died

    monkeypatch.setattr(rundir.shutil, "rmtree", crash)
    with pytest.raises(Died):
        ledger.begin_stage("s", {"fingerprint": "new", "family": "new", "scope": {}, "upstream": None, "settings": {}}, output, [[Unit("u")]])
    monkeypatch.undo()

    # The old unit record and output are still on disk, but nothing passes them off as done any more.
    assert (output / "u.bin").exists() and ledger.unit_record("s", "u")["fingerprint"] == "old"
    assert ledger.stage_record("s")["fingerprint"] == "new" and not ledger.summary("s")["done"]
    assert not ledger.is_done("s", "u", "new")

    # Whichever settings the rerun has, it clears first and finds nothing done.
    for fp in ("old", "new"):
        ledger.begin_stage("s", {"fingerprint": fp, "family": fp, "scope": {}, "upstream": None, "settings": {}}, output, [[Unit("u")]])
        assert not output.exists() and ledger.unit_record("s", "u") is None and not ledger.summary("s")["done"]


def test_a_full_disk_is_one_line_wherever_it_happens():
    line = describe_error(OSError(errno.ENOSPC, "No space left on device", "/shared/run/pairs/x.parquet"))
    assert line.startswith("no space left on device writing /shared/run/pairs/x.parquet") and "finished units are kept" in line
    assert describe_error(ValueError("bad")) == "ValueError: bad"
