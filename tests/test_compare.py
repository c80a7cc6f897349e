"""`megasynth compare`: the statistics on literals, hard negatives that say their space, and the page of
two demo-sized runs rendered in headless Chromium (every image loaded, no console error, a screenshot kept)."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import compare, runner
from pipeline.compare import distinct_ngrams, pairs_per_query, repeated_share, settings_diff, space_overlap, worker_resources
from pipeline.config import load_config
from pipeline.rundir import Ledger
from stages import catalog
from stages.knn.exact import pack

ARTIFACTS = Path(__file__).parent / "artifacts"


# --- statistics on literals -----------------------------------------------------------------------


def test_distinct_ngrams_and_verbatim_repeats():
    texts = ["Find a red car", "find a RED car", "Show the blue sky"]
    assert distinct_ngrams(texts, 1) == 8 / 12  # find a red car show the blue sky: 8 distinct words of 12
    assert distinct_ngrams(texts, 2) == 6 / 9
    assert distinct_ngrams(["one"], 2) is None
    assert repeated_share(texts) == 2 / 3  # case aside, the first two are one instruction
    assert repeated_share(["a  b", "a b", "c"]) == 2 / 3 and repeated_share([]) is None


def test_pairs_per_query_counts_the_queries_without_pairs():
    assert pairs_per_query([2, 1, 2], queries=5).tolist() == [2, 1, 2]
    assert pairs_per_query([], queries=3).tolist() == [3]
    with pytest.raises(ValueError, match="only 1 were mined"):
        pairs_per_query([1, 1], queries=1)


def test_space_overlap_names_each_combination_once():
    found = space_overlap(np.array([0, 0, 1, 2, 2]), np.array(["semantic", "caption", "caption", "caption", "semantic"]), pairs=3)
    assert found == Counter({"caption+semantic": 2, "caption": 1})
    assert space_overlap(np.array([], np.int64), np.array([], str), pairs=0) == Counter()


def test_worker_resources_from_recorded_settings():
    assert worker_resources("ingest", {"cpus": 2.0}) == (2.0, 0.0)
    assert worker_resources("embed", {"cpus": 8, "device": "cuda"}) == (8.0, 1.0)
    assert worker_resources("embed", {"cpus": 1, "device": "auto"}) == (1.0, None)  # decided on the machine that ran it
    assert worker_resources("search", {"cpus": 1, "device": "cpu", "gpus": 0.5}) == (1.0, 0.5)
    both = {"describer": {"backend": "transformers", "device": "cuda"}, "instructor": {"backend": "openai"}}
    assert worker_resources("annotate", {"cpus": 1, **both}) == (1.0, 1.0)
    assert worker_resources("annotate", {"cpus": 1, "describer": {"backend": "vllm", "tensor_parallel_size": 2},
                                         "instructor": {"backend": "transformers", "device": "cpu"}}) == (1.0, 0.0)  # fmt: skip


def test_settings_diff_lists_only_what_differs():
    a = {"mine": {"k": 8, "band": [0.8, 0.96]}, "seed": 0}
    b = {"mine": {"k": 8, "band": [0.7, 0.96]}, "seed": 0, "write": {"maxcount": 5}}
    assert settings_diff([a, b]) == [("mine.band", [[0.8, 0.96], [0.7, 0.96]]), ("write.maxcount", [None, 5])]


# --- hard negatives say which space their score comes from ----------------------------------------


def test_hard_negatives_record_the_space_of_their_score(local_run):
    """Each hard negative's score is its highest similarity to the query over the mined spaces, and `space` names that space."""
    ledger = Ledger(local_run)
    cat = ledger.source("ingest") / "catalog"
    ordinal = {}
    for i, shard in enumerate(catalog.shards(cat)):
        ids = catalog.read(cat, shard, ok_only=False, columns=["id"])["id"].to_pylist()
        ordinal.update(zip(ids, pack(i, np.arange(len(ids))).tolist()))
    lists = {}  # (query ordinal, space) -> {neighbour ordinal: score}
    for f in sorted((ledger.source("search") / "neighbours").glob("*.parquet")):
        t = pq.read_table(f).to_pylist()
        for row in t:
            for space in ("semantic", "pattern", "caption"):
                lists[row["query_ordinal"], space] = dict(zip(row[f"{space}.ordinal"], row[f"{space}.score"]))
    checked = 0
    for f in sorted((ledger.source("mine") / "pairs").glob("*.parquet")):
        for p in pq.read_table(f).to_pylist():
            q = ordinal[p["query_id"]]
            for h in p["hard_negatives"]:
                found = {sp: lists[q, sp][ordinal[h["id"]]] for sp in ("semantic", "pattern", "caption") if ordinal[h["id"]] in lists[q, sp]}
                best = max(found.values())
                assert h["space"] in found and found[h["space"]] == best == pytest.approx(h["score"]), (p["pair_id"], h, found)
                checked += 1
    assert checked > 20


# --- the page, in a real browser ------------------------------------------------------------------


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe): no port, no extra package."""

    def __init__(self, binary: str, profile: Path):
        to_chrome, self._write = os.pipe()
        self._read, from_chrome = os.pipe()
        to_chrome, from_chrome = (_above_four(fd) for fd in (to_chrome, from_chrome))
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--remote-debugging-pipe", f"--user-data-dir={profile}", "--window-size=1400,1000", "about:blank"]  # fmt: skip
        # the protocol runs on the child's fds 3 (commands in) and 4 (replies out)
        shell = f'exec "$0" "$@" 3<&{to_chrome} 4>&{from_chrome} {to_chrome}<&- {from_chrome}>&-'
        self.proc = subprocess.Popen(["bash", "-c", shell, binary, *args], pass_fds=(to_chrome, from_chrome),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        os.close(to_chrome)
        os.close(from_chrome)
        self._buf, self._next, self.events = b"", 0, []
        page = next(t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=True)

    def call(self, method: str, session: bool = False, timeout: float = 60, **params) -> dict:
        self._next += 1
        msg = {"id": self._next, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._write, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._message(timeout)
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60) -> dict:
        while True:
            event = self._message(timeout)
            self.events.append(event)
            if event.get("method") == method:
                return event

    def _message(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._read], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium exited: {self.proc.stderr.read().decode(errors='replace')[-2000:]}")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads the page reported."""
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
                out.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
            elif e.get("method") == "Runtime.exceptionThrown":
                out.append(f"exception: {p['exceptionDetails'].get('exception', {}).get('description') or p['exceptionDetails']['text']}")
            elif e.get("method") == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(f"log: {p['entry']['text']} {p['entry'].get('url', '')}")
        return out

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._write)
        os.close(self._read)


def _above_four(fd: int) -> int:
    """The same pipe end on a descriptor >= 10, so moving it to 3 or 4 in the child never overwrites the other."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


def render(page: Path, screenshot: Path | None, profile: Path) -> dict:
    """Open `page` from disk; its images (complete, naturalWidth), errors, and a full-page screenshot."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed; `make test` installs Debian's chromium package")
        pytest.skip("chromium is not installed (Debian: apt-get install chromium; `make test` does it)")
    browser = Chromium(binary, profile)
    try:
        browser.call("Page.navigate", session=True, url=page.resolve().as_uri())
        browser.wait_for("Page.loadEventFired")
        images = browser.call("Runtime.evaluate", session=True, returnByValue=True, expression=(
            "[...document.images].map(i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth}))"))["result"]["value"]  # fmt: skip
        text = browser.call("Runtime.evaluate", session=True, returnByValue=True, expression="document.body.innerText")["result"]["value"]
        if screenshot is not None:
            size = browser.call("Page.getLayoutMetrics", session=True)["cssContentSize"]
            height = min(int(size["height"]) + 1, 16000)
            browser.call("Emulation.setDeviceMetricsOverride", session=True, width=1400, height=height, deviceScaleFactor=1, mobile=False)
            shot = browser.call("Page.captureScreenshot", session=True, format="png", captureBeyondViewport=True)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
        return {"images": images, "errors": browser.errors(), "text": text}
    finally:
        browser.close()


def test_the_browser_check_sees_a_broken_image_and_a_console_error(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text('<!doctype html><html><body><img alt="gone" src="missing.png"><script>console.error("boom")</script></body></html>')
    seen = render(page, None, tmp_path / "profile")
    assert seen["images"] == [{"alt": "gone", "complete": True, "width": 0}]
    assert any("boom" in e for e in seen["errors"]) and any("missing.png" in e for e in seen["errors"]), seen["errors"]


@pytest.fixture(scope="module")
def variant_run(local_run, pipeline_config, tmp_path_factory) -> Path:
    """The test run with fewer hard negatives and a wider semantic band, reusing everything before mine."""
    out = tmp_path_factory.mktemp("compare") / "variant"
    overrides = ["mine.hard_negatives=2", "mine.bands.semantic=[0.6,0.96]"]
    runner.run(load_config(pipeline_config, overrides), out, progress=False, reuse=(local_run,))
    return out


def test_compare_page_of_two_runs_renders_in_chromium(local_run, variant_run, tmp_path):
    out = tmp_path / "report.html"
    cmd = [sys.executable, "-m", "pipeline.cli", "compare", str(local_run), str(variant_run), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    html = out.read_text()
    assert "src=\"http" not in html and "<script" not in html  # self-contained: nothing to fetch

    shot = ARTIFACTS / "compare.png"
    seen = render(out, shot, tmp_path / "profile")
    print(f"\nscreenshot: {shot}")
    assert seen["errors"] == []
    figures = [i["alt"] for i in seen["images"] if i["alt"] not in ("query", "target", "hard negative")]
    assert figures == ["neighbour similarity per space", "pairs per query", "spaces that found each pair", "hard-negative scores by space",
                       "words per instruction", "CPU- and GPU-seconds per stage"]  # fmt: skip
    assert all(i["complete"] and i["width"] > 0 for i in seen["images"]), seen["images"]
    thumbs = Counter(i["alt"] for i in seen["images"])
    assert thumbs["query"] == thumbs["target"] == 2 * compare.TRIPLETS_PER_RUN
    assert thumbs["hard negative"] >= compare.TRIPLETS_PER_RUN * (4 + 2) - 2  # 4 per triplet in the base run, 2 in the variant

    text = seen["text"]
    assert "mine.hard_negatives" in text and "mine.bands.semantic" in text  # the settings that differ
    assert "Measured quality" in text
    assert "max over spaces" not in text and any(f"{sp} 0." in text for sp in ("semantic", "pattern", "caption"))
    assert shot.stat().st_size > 50_000
