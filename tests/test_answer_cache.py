"""The answer cache shared through one folder: many processes and nodes writing and reading it at once."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os

import pytest

from stages.annotation.cache import ANSWERS, AnswerCache, answer_files
from stages.base import TMP_MARK


def key(*parts) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def answers_of(writer: str, chunk: int, n: int = 10) -> dict[str, str]:
    """A chunk's answers; keys ("shared", chunk, i) are written by every writer with the same answer."""
    own = {key(writer, chunk, i): f"{writer} answer {chunk}.{i} " + "é" * (i % 3) for i in range(n)}
    shared = {key("shared", chunk, i): f"shared answer {chunk}.{i}" for i in range(2)}
    return {**own, **shared}


def test_answers_written_by_one_instance_are_read_by_another(tmp_path):
    a = AnswerCache(tmp_path)
    b = AnswerCache(tmp_path)  # opened before anything was written
    a.put_many(answers_of("a", 0))
    wanted = answers_of("a", 0)
    assert b.get_many([*wanted, key("missing")]) == wanted  # a miss makes it look again
    assert AnswerCache(tmp_path).get_many(list(wanted)) == wanted
    [path] = answer_files(tmp_path / ANSWERS)
    before = path.read_bytes()
    a.put_many(answers_of("a", 1))
    assert path.read_bytes() == before and len(answer_files(tmp_path / ANSWERS)) == 2  # files are never changed, only added


def test_other_caches_are_read_and_never_written(tmp_path):
    other = AnswerCache(tmp_path / "other")
    other.put_many(answers_of("other", 0))
    files = {p: p.read_bytes() for p in answer_files(tmp_path / "other" / ANSWERS)}
    mine = AnswerCache(tmp_path / "mine", read_also=[tmp_path / "other", tmp_path / "absent"])
    assert mine.get_many(list(answers_of("other", 0))) == answers_of("other", 0)
    mine.put_many(answers_of("mine", 0))
    assert {p: p.read_bytes() for p in answer_files(tmp_path / "other" / ANSWERS)} == files
    assert len(answer_files(tmp_path / "mine" / ANSWERS)) == 1


def test_an_unreadable_file_is_skipped_and_its_answers_are_asked_again(tmp_path, caplog):
    AnswerCache(tmp_path).put_many(answers_of("a", 0))
    (tmp_path / ANSWERS / "0123.parquet").write_bytes(b"PAR1 not really")  # a copy cut short by hand, say
    (tmp_path / ANSWERS / f"{TMP_MARK}1-2-x.parquet").write_bytes(b"half written")  # someone's write in progress
    cache = AnswerCache(tmp_path)
    assert cache.get_many(list(answers_of("a", 0))) == answers_of("a", 0)
    assert len(cache) == len(answers_of("a", 0)) and "0123.parquet is unreadable" in caplog.text


def test_an_answer_that_is_not_valid_unicode_is_not_cached(tmp_path):
    cache = AnswerCache(tmp_path)
    cache.put_many({key(1): "fine", key(2): "lone \udc80 surrogate"})
    assert AnswerCache(tmp_path).get_many([key(1), key(2)]) == {key(1): "fine"}


def test_many_files_stay_one_index(tmp_path):
    cache = AnswerCache(tmp_path)
    expected = {}
    for chunk in range(40):  # more files than index segments: they are merged
        cache.put_many(answers_of("a", chunk, n=3))
        expected.update(answers_of("a", chunk, n=3))
    assert AnswerCache(tmp_path).get_many(list(expected)) == expected == cache.get_many(list(expected))


# --- two processes, then three nodes, on one cache folder ---------------------------------------------

CHUNKS = 30


def write_and_read(folder: str, writer: str, others: list[str], barrier=None) -> dict:
    """Write CHUNKS chunks, reading the others' answers as they come; then everything, once all writers are done."""
    cache = AnswerCache(folder)
    if barrier is not None:
        barrier.wait()
    seen_early = 0
    for chunk in range(CHUNKS):
        cache.put_many(answers_of(writer, chunk))
        for other in others:
            wanted = answers_of(other, max(0, chunk - 1))
            got = cache.get_many(list(wanted))
            assert all(got[k] == wanted[k] for k in got), "an answer read back differs from the one written"
            seen_early += len(got)
    return {"writer": writer, "seen_early": seen_early, "pid": os.getpid()}


def read_everything(folder: str, writers: list[str]) -> int:
    """How many answers a fresh reader finds of all the writers wrote (an assertion if any differs)."""
    expected = {k: v for w in writers for c in range(CHUNKS) for k, v in answers_of(w, c).items()}
    got = AnswerCache(folder).get_many(list(expected))
    assert got == {k: expected[k] for k in got}
    return len(got) - len(expected)  # 0 when nothing was lost


def _process(folder: str, writer: str, others: list[str], barrier, results) -> None:
    results.put(write_and_read(folder, writer, others, barrier))


def test_two_processes_write_and_read_one_cache_at_once(tmp_path):
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_process, args=(str(tmp_path), w, [o], barrier, results)) for w, o in (("p1", "p2"), ("p2", "p1"))]
    for p in procs:
        p.start()
    outcome = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len({r["pid"] for r in outcome}) == 2 and sum(r["seen_early"] for r in outcome) > 0  # they did overlap
    assert read_everything(str(tmp_path), ["p1", "p2"]) == 0
    assert not list((tmp_path / ANSWERS).glob(f"{TMP_MARK}*"))
    assert len(answer_files(tmp_path / ANSWERS)) == 2 * CHUNKS


@pytest.mark.slow
def test_three_nodes_write_and_read_one_cache_at_once(tmp_path):
    """Three raylets on this machine, one task pinned to each: all write at once; then every node reads everything."""
    import sys

    import ray
    from ray import cloudpickle
    from ray.cluster_utils import Cluster
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address)
        cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import a test module
        cluster.wait_for_nodes()
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        assert len(nodes) == 3
        writers = [f"node{i}" for i in range(3)]

        def on(node: str):
            return NodeAffinitySchedulingStrategy(node, soft=False)

        write = ray.remote(num_cpus=1)(write_and_read)
        read = ray.remote(num_cpus=1)(read_everything)
        folder = str(tmp_path)
        done = ray.get([write.options(scheduling_strategy=on(n)).remote(folder, w, [o for o in writers if o != w])
                        for n, w in zip(nodes, writers)], timeout=120)  # fmt: skip
        assert sum(r["seen_early"] for r in done) > 0
        assert ray.get([read.options(scheduling_strategy=on(n)).remote(folder, writers) for n in nodes], timeout=120) == [0, 0, 0]
        assert len(answer_files(tmp_path / ANSWERS)) == 3 * CHUNKS
    finally:
        ray.shutdown()
        cluster.shutdown()
