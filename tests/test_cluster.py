"""A run on a real Ray cluster of several nodes on this machine, disturbed as clusters are.

`ray.cluster_utils.Cluster` starts a head and worker raylets here; `remove_node` kills a node
without warning, and SIGKILL takes a worker process, an actor or the driver. Each run must end
with the bytes an undisturbed run writes. The cluster is started from another working directory
than the driver's, as `ray start` on each machine is, and the driver passes relative paths.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import digest
from pipeline import runner
from pipeline.config import load_config

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    from ray.cluster_utils import Cluster

    elsewhere = tmp_path / "where-ray-was-started"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the raylets and their workers run from here, not from the driver's folder
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})  # the head hosts no work
    for _ in range(3):
        c.add_node(num_cpus=1)
    c.wait_for_nodes()
    monkeypatch.undo()
    yield c
    c.shutdown()


class Driver:
    """`megasynth run` in its own process, as a user starts it, with its log in a file."""

    def __init__(self, cwd: Path, *args: str):
        self.log = cwd / f"driver-{time.monotonic_ns()}.log"
        env = {**os.environ, "MEGASYNTH_LOG": "WARNING"}
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", *args, "--quiet"], cwd=cwd, env=env,
                                         stdout=f, stderr=subprocess.STDOUT)  # fmt: skip

    def text(self) -> str:
        return self.log.read_text()

    def wait(self, timeout: float = 600) -> int:
        return self.proc.wait(timeout)


def units_done(run: Path, stage: str) -> int:
    return len([p for p in (run / "_state" / stage / "units").glob("*.json") if not p.name.startswith(".")])


def busy_workers(kind: str) -> list[psutil.Process]:
    """Ray worker processes busy with a unit: `ray::_task` (a task) or `ray::_Worker.run` (an actor's method)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith(f"ray::{kind}"):
            found.append(p)
    return found


def wait_until(condition, driver: Driver, what: str, timeout: float = 400):
    """The condition's first true value, polled while the driver runs."""
    deadline = time.time() + timeout
    while not (value := condition()):
        assert driver.proc.poll() is None, f"the run ended before {what}:\n{driver.text()[-3000:]}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def worker_node_of(cluster, pid: int):
    """The cluster node whose raylet is an ancestor of process `pid` (None: not found)."""
    try:
        ancestors = {p.pid for p in psutil.Process(pid).parents()}
    except psutil.NoSuchProcess:
        return None
    return next((n for n in cluster.worker_nodes if n.all_processes["raylet"][0].process.pid in ancestors), None)


def busy_node(cluster, kind: str):
    """A worker node running a unit of the stage now (None: none is seen busy)."""
    return next((n for p in busy_workers(kind) if (n := worker_node_of(cluster, p.pid)) is not None), None)


def remove_node(cluster, node=None):
    """Kill, without warning, `node` (any worker node if None); a replacement joins, as on a cluster that autoscales."""
    cluster.remove_node(node or next(iter(cluster.worker_nodes)), allow_graceful=False)
    cluster.add_node(num_cpus=1)


def remove_busy_node(cluster, kind: str, driver: Driver, what: str) -> None:
    """Wait until a worker runs a unit of the stage, then kill its node: the disturbance always lands on work
    in flight, however fast or slow this machine is."""
    remove_node(cluster, wait_until(lambda: busy_node(cluster, kind), driver, what))


def kill_busy_worker(kind: str, driver: Driver, what: str) -> None:
    """Wait until a worker runs a unit of the stage, then SIGKILL it."""
    wait_until(lambda: busy_workers(kind), driver, what)[0].kill()


def split_corpus(src: Path, dst: Path, per_shard: int) -> Path:
    """The same samples in more, smaller shards: enough ingest units to lose some in flight."""
    dst.mkdir()
    samples: dict[str, list[tuple[str, bytes]]] = {}
    for shard in sorted(src.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.isfile():
                    samples.setdefault(f"{shard.stem}-{m.name.split('.')[0]}", []).append((m.name, tar.extractfile(m).read()))
    keys = sorted(samples)
    for i in range(0, len(keys), per_shard):
        with tarfile.open(dst / f"{i // per_shard:05d}.tar", "w") as tar:
            for key in keys[i : i + per_shard]:
                for name, data in samples[key]:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return dst


def test_ingest_survives_a_killed_task_and_a_lost_node(cluster, corpus, pipeline_config, tmp_path, monkeypatch):
    small = split_corpus(corpus, tmp_path / "shards", per_shard=10)
    cfg = yaml.safe_load(pipeline_config.read_text())
    cfg["corpus"]["paths"] = [f"{small.name}/*.tar"]  # relative to the driver's folder: resolved there, not on workers
    (tmp_path / "ingest.yaml").write_text(yaml.safe_dump(cfg))
    reference = tmp_path / "reference"
    with monkeypatch.context() as m:
        m.chdir(tmp_path)
        runner.run(load_config(tmp_path / "ingest.yaml"), reference, only="ingest", progress=False)

    driver = Driver(tmp_path, "ingest.yaml", "--out", "runs/cluster", "--stage", "ingest", "--ray-address", cluster.address)
    run = tmp_path / "runs" / "cluster"
    wait_until(lambda: units_done(run, "ingest") >= 1, driver, "an ingest unit was done")
    kill_busy_worker("_task", driver, "an ingest task was running")  # a worker process dies mid-unit
    wait_until(lambda: units_done(run, "ingest") >= 6, driver, "more ingest units were done")
    remove_node(cluster, busy_node(cluster, "_task"))  # the last units may be done already: then any node goes
    assert driver.wait() == 0, driver.text()[-3000:]
    assert "its worker was lost" in driver.text()
    assert units_done(run, "ingest") == len(list(small.glob("*.tar")))
    assert digest(run) == digest(reference)
    assert not list(run.rglob(".tmp-*"))  # nothing the killed worker was writing is left behind


def test_a_run_survives_lost_nodes_a_killed_actor_and_a_killed_driver(cluster, local_run, pipeline_config, tmp_path):
    run = tmp_path / "runs" / "cluster"
    args = (str(pipeline_config), "--out", "runs/cluster", "--ray-address", cluster.address)
    driver = Driver(tmp_path, *args)
    wait_until(lambda: units_done(run, "embed") >= 1, driver, "an embed unit was done")
    remove_busy_node(cluster, "_Worker.run", driver, "a unit was running")  # a node with a loaded model goes away mid-unit
    wait_until(lambda: units_done(run, "annotate") >= 1, driver, "an annotate unit was done")
    kill_busy_worker("_Worker.run", driver, "an annotate unit was running")  # an actor dies mid-unit
    wait_until(lambda: units_done(run, "annotate") >= 2, driver, "another annotate unit was done")
    remove_busy_node(cluster, "_Worker.run", driver, "an annotate unit was running")
    wait_until(lambda: units_done(run, "annotate") >= 3, driver, "a third annotate unit was done")
    first = driver.text()
    driver.proc.kill()  # the driver dies mid-run
    driver.wait()
    assert first.count("its worker was lost") >= 2, first[-3000:]
    assert units_done(run, "embed") == 4  # embed finished in spite of the node it lost

    again = Driver(tmp_path, *args)
    assert again.wait() == 0, again.text()[-3000:]
    assert digest(run) == digest(local_run)
    assert not list(run.rglob(".tmp-*"))


def test_a_unit_no_node_can_host_ends_the_run_with_one_line(cluster, pipeline_config, tmp_path):
    cfg = load_config(pipeline_config, ["embed.gpus=1", "executor.placement_timeout_s=5", f"executor.ray_address={cluster.address}",
                                        "executor.kind=ray"])  # fmt: skip
    t0 = time.time()
    with pytest.raises(Exception, match=r"embed: no node can run a worker \(each needs CPU 1, GPU 1\) for 5 s; alive nodes: "):
        runner.run(cfg, tmp_path / "run", progress=False)
    assert time.time() - t0 < 120
    from pipeline.rundir import Ledger

    assert "no node can run a worker" in Ledger(tmp_path / "run").summary("embed")["failed"]["message"]


def test_an_endpoint_key_set_only_on_the_driver_reaches_the_workers(cluster, local_run, pipeline_config, text_models, tmp_path, monkeypatch):
    """The nodes were started before the key was set: only the driver has it, as on a cluster started elsewhere."""
    from openai_server import Fault, OpenAIServer, load_generators

    served = load_generators({"describer": (str(text_models["describer"]), True), "instructor": (str(text_models["instructor"]), False)})
    monkeypatch.setenv("MEGASYNTH_CLUSTER_KEY", "sk-cluster-5f0e")
    with OpenAIServer(served, api_key="sk-cluster-5f0e") as srv:
        endpoint = {"backend": "openai", "base_url": srv.base_url, "api_key_env": "MEGASYNTH_CLUSTER_KEY", "max_new_tokens": 100}
        cfg = load_config(pipeline_config, [f"executor.ray_address={cluster.address}", "executor.kind=ray", "mine.queries=8",
                                            "mine.pairs_per_query=1"],  # fmt: skip
                          patch={"annotate": {"describer": {**endpoint, "model": "describer"}, "instructor": {**endpoint, "model": "instructor"}}})
        srv.inject(Fault("503"))  # one retry, logged by a worker on another node
        summary = runner.run(cfg, tmp_path / "run", progress=False, reuse=(local_run,))
    assert summary["search"]["source"] == str(local_run)  # the earlier search covers this smaller sample
    assert summary["annotate"]["done"] and summary["annotate"]["input"] > 0
    assert all(status != 401 for _, status, *_ in srv.state.log)  # every request carried the key
    logs = "".join(p.read_text() for p in (tmp_path / "run" / "_state" / "annotate" / "logs").glob("*.log"))
    assert "retrying" in logs and " pid " in logs  # what the worker logged is in the run folder, with its host and pid

