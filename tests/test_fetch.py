"""fetch: Recap-DataComp-style URL tables -> img2dataset -> the shards ingest reads, every failed URL with its reason.

The URLs point at an HTTP server on 127.0.0.1 that the test starts: real JPEG and PNG images, a 404, an HTML
page, garbage and truncated bytes labelled image/jpeg, a URL slower than the timeout, an image its site
forbids with X-Robots-Tag, a port nobody listens on and a string that is not a URL.
"""

from __future__ import annotations

import io
import json
import socket
import sys
import tarfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import api
from pipeline.fetch import FetchError, column_map, failure_reason, fetch, summarize
from stages import catalog

# Recap-DataComp-1B's columns, as its dataset card lists them.
RECAP_COLUMNS = ["url", "re_caption", "org_caption", "sha256", "key", "re_clip_score", "org_clip_score",
                 "re_length", "org_length", "re_gpt4v_score", "org_gpt4v_score"]  # fmt: skip
SLOW_S = 2.5  # the slow URL answers after this; the fetch times out after 1 s


def image_bytes(size: tuple[int, int], fmt: str, seed: int, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    w, h = size
    base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * rng.random(3, dtype=np.float32)
    pixels = np.clip(base + rng.normal(0, 2, (h, w, 3)), 0, 255).astype(np.uint8)  # a gradient: survives JPEG
    img = Image.fromarray(pixels)
    if mode == "RGBA":
        img.putalpha(255)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


GOOD = {  # path -> (content type, bytes)
    "/img/0.jpg": ("image/jpeg", image_bytes((64, 48), "JPEG", 0)),
    "/img/1.jpg": ("image/jpeg", image_bytes((120, 90), "JPEG", 1)),
    "/img/2.jpg": ("image/jpeg", image_bytes((800, 600), "JPEG", 2)),  # larger than 512: shrunk
    "/img/3.png": ("image/png", image_bytes((96, 64), "PNG", 3)),
    "/img/4.png": ("image/png", image_bytes((50, 70), "PNG", 4, mode="RGBA")),
    "/img/5": ("application/octet-stream", image_bytes((70, 70), "JPEG", 5)),  # no extension, generic type
}
BAD = {  # path -> (content type, bytes, expected reason)
    "/page.html": ("text/html", b"<html><body><img src='/img/0.jpg'></body></html>", "undecodable"),
    "/garbage.jpg": ("image/jpeg", bytes(np.random.default_rng(9).integers(0, 256, 3000, dtype=np.uint8)), "undecodable"),
    "/truncated.jpg": ("image/jpeg", image_bytes((200, 150), "JPEG", 6)[:1500], "undecodable"),
    "/noai.jpg": ("image/jpeg", image_bytes((40, 40), "JPEG", 7), "disallowed_by_site"),
    "/slow.jpg": ("image/jpeg", image_bytes((40, 40), "JPEG", 8), "timeout"),
}


class Handler(BaseHTTPRequestHandler):
    requests: list[str]
    lock: threading.Lock

    def do_GET(self):  # noqa: N802
        with self.lock:
            self.requests.append(self.path)
        if self.path == "/slow.jpg":
            time.sleep(SLOW_S)
        if self.path in GOOD:
            ctype, body = GOOD[self.path]
        elif self.path in BAD:
            ctype, body, _ = BAD[self.path]
        else:
            self.send_error(404)
            return
        try:
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            if self.path == "/noai.jpg":
                self.send_header("X-Robots-Tag", "noai, noimageai")
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (the slow URL)
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    handler = type("H", (Handler,), {"requests": [], "lock": threading.Lock()})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    srv.requests = handler.requests
    yield srv
    srv.shutdown()
    srv.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def url_tables(folder: Path, base: str) -> tuple[dict[str, dict], dict[str, str]]:
    """Two parquet files with Recap-DataComp-1B's columns; the rows by URL, and the reason each bad URL should fail with."""
    expected = {f"{base}{p}": v[2] for p, v in BAD.items()}
    expected[f"{base}/missing.jpg"] = "http_404"
    expected[f"http://127.0.0.1:{closed_port()}/img/0.jpg"] = "unreachable"
    expected["not a url"] = "bad_url"
    urls = [f"{base}{p}" for p in GOOD] + list(expected)
    urls = urls[::2] + urls[1::2]  # good and bad in every shard
    rows = []
    for i, url in enumerate(urls):
        rows.append({"url": url, "re_caption": f"The image shows scene number {i} in detail.", "org_caption": f"scene {i}",
                     "sha256": f"{i:064x}", "key": f"{i:09d}", "re_clip_score": 0.2 + i / 100, "org_clip_score": 0.3,
                     "re_length": 9, "org_length": 2, "re_gpt4v_score": 4, "org_gpt4v_score": 2})  # fmt: skip
    folder.mkdir()
    table = pa.Table.from_pylist(rows).select(RECAP_COLUMNS)
    pq.write_table(table.slice(0, 9), folder / "train-00000-of-00002.parquet")  # 2 shards of 5 and 4 URLs
    pq.write_table(table.slice(9), folder / "train-00001-of-00002.parquet")  # 1 shard of 5
    return {r["url"]: r for r in rows}, expected


def tar_samples(out: Path) -> dict[str, dict]:
    """Every sample of every tar: key -> {ext: bytes}."""
    samples: dict[str, dict] = {}
    for path in sorted(out.glob("*.tar")):
        with tarfile.open(path) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                assert ext not in samples.setdefault(key, {}), f"{m.name} twice"
                samples[key][ext] = tar.extractfile(m).read()
    return samples


def test_failure_reason_names_what_went_wrong():
    assert failure_reason("failed_to_download", "HTTP Error 404: Not Found") == "http_404"
    assert failure_reason("failed_to_download", "HTTP Error 503: Service Unavailable") == "http_503"
    assert failure_reason("failed_to_download", "timed out") == "timeout"
    assert failure_reason("failed_to_download", "<urlopen error timed out>") == "timeout"
    assert failure_reason("failed_to_download", "The read operation timed out") == "timeout"
    assert failure_reason("failed_to_download", "<urlopen error [Errno 111] Connection refused>") == "unreachable"
    assert failure_reason("failed_to_download", "<urlopen error [Errno -2] Name or service not known>") == "unreachable"
    assert failure_reason("failed_to_download", "Use of image disallowed by X-Robots-Tag directive") == "disallowed_by_site"
    assert failure_reason("failed_to_download", "hash mismatch") == "hash_mismatch"
    assert failure_reason("failed_to_download", "unknown url type: 'None'") == "bad_url"
    assert failure_reason("failed_to_download", "Remote end closed connection without response") == "download_error"
    assert failure_reason("failed_to_resize", "Image decoding error") == "undecodable"
    assert failure_reason("failed_to_resize", "image too small") == "too_small"
    assert failure_reason("failed_to_resize", "cv2 said no") == "resize_error"


def test_column_map_keeps_recap_columns_under_names_ingest_and_img2dataset_accept():
    m = column_map(RECAP_COLUMNS)
    assert m["url"] == "url" and m["org_caption"] == "caption" and m["re_caption"] == "re_caption"
    assert m["key"] == "source_key" and m["sha256"] == "source_sha256"  # img2dataset writes its own key and sha256
    assert all(m[c] == c for c in RECAP_COLUMNS if c.endswith(("score", "length")))
    assert column_map(RECAP_COLUMNS, verify_hash="sha256")["sha256"] == "sha256"
    assert list(column_map(RECAP_COLUMNS, keep=["key"])) == ["url", "org_caption", "re_caption", "key"]
    assert column_map(["link", "text"], url_col="link", caption_col="text", re_caption_col=None) == {"link": "url", "text": "caption"}
    with pytest.raises(FetchError, match=r"no column 'caption' in the URL table \(columns: url, re_caption"):
        column_map(RECAP_COLUMNS, caption_col="caption")
    with pytest.raises(FetchError, match="one column in two roles"):
        column_map(RECAP_COLUMNS, caption_col="re_caption")


def test_fetch_writes_the_shards_ingest_reads_reports_every_failure_and_resumes(tmp_path, server):
    from typer.testing import CliRunner

    from pipeline.cli import app

    base = f"http://127.0.0.1:{server.server_port}"
    rows, expected = url_tables(tmp_path / "urls", base)
    out = tmp_path / "shards"
    args = dict(shard_size=5, processes=1, threads=4, timeout=1)
    s = fetch(str(tmp_path / "urls" / "*.parquet"), out, **args)

    # every URL accounted for: written, or failed with its reason
    assert (s.urls, s.written, s.not_done, s.unaccounted) == (14, len(GOOD), 0, 0)
    assert s.failed == dict(Counter(expected.values())), s.examples
    assert s.examples["http_404"] == "HTTP Error 404: Not Found"
    assert (s.shards, s.shards_done, s.shards_new) == (3, 3, 3)
    served = Counter(server.requests)
    assert served == Counter({p: 1 for p in [*GOOD, *BAD, "/missing.jpg"]})  # each once; nothing else asked for
    assert summarize(out) == s.__class__(**{**s.to_dict(), "shards_new": 0, "seconds": 0.0})

    # the shards: each good image, its captions and every other Recap column; nothing for a failed URL
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    samples = tar_samples(out)
    assert len(samples) == len(GOOD)
    for key, sample in samples.items():
        assert set(sample) == {"jpg", "txt", "json"}
        meta = json.loads(sample["json"])
        row = rows[meta["url"]]
        assert meta["status"] == "success" and meta["caption"] == row["org_caption"] == sample["txt"].decode()
        assert meta["re_caption"] == row["re_caption"]
        assert (meta["source_key"], meta["source_sha256"], meta["re_clip_score"]) == (row["key"], row["sha256"], row["re_clip_score"])
        assert meta["key"] == key
        served_img = Image.open(io.BytesIO(GOOD[meta["url"][len(base):]][1])).convert("RGB")
        got = Image.open(io.BytesIO(sample["jpg"]))
        if min(served_img.size) > 512:
            assert min(got.size) == 512 and abs(got.width / got.height - served_img.width / served_img.height) < 0.01
            served_img = served_img.resize(got.size)
        else:
            assert got.size == served_img.size  # not enlarged
        assert np.abs(np.asarray(got, np.float32) - np.asarray(served_img, np.float32)).mean() < 6  # the same picture

    # megasynth ingests the folder as it is: every image with its caption and re-caption
    cfg = api.load_config(None, ["executor.kind=local", "corpus.keep_fields=[source_key,re_clip_score]"], [f"{out}/*.tar"])
    summary = api.run(cfg, tmp_path / "run", stage="ingest", progress=False)
    assert (summary["ingest"]["input"], summary["ingest"]["output"]) == (len(GOOD), len(GOOD))
    cat = [r for sh in catalog.shards(tmp_path / "run" / "catalog") for r in catalog.read(tmp_path / "run" / "catalog", sh).to_pylist()]
    assert len(cat) == len(GOOD)
    for r in cat:
        row = rows[r["url"]]
        assert (r["caption"], r["re_caption"]) == (row["org_caption"], row["re_caption"])
        assert json.loads(r["meta"]) == {"source_key": row["key"], "re_clip_score": row["re_clip_score"]}

    # a rerun of the same command: nothing downloaded again, nothing duplicated
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    cli = ["fetch", str(tmp_path / "urls" / "*.parquet"), "--out", str(out), "--shard-size", "5", "--processes", "1",
           "--threads", "4", "--timeout", "1"]  # fmt: skip
    result = CliRunner().invoke(app, cli)
    assert result.exit_code == 0, result.output
    assert f"{len(GOOD)} images" in result.output and "undecodable" in result.output
    assert len(server.requests) == sum(served.values())
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == mtimes
    assert tar_samples(out).keys() == samples.keys()

    # a shard that did not finish (killed) is downloaded again on the rerun, and only it
    shard1 = [u[len(base):] for u in pq.read_table(out / "00001.parquet")["url"].to_pylist() if u.startswith(base)]
    (out / "00001_stats.json").unlink()
    assert summarize(out).not_done == 4  # the first table's second shard: its rows 5 to 8
    s2 = fetch(str(tmp_path / "urls" / "*.parquet"), out, **args)
    assert Counter(server.requests[sum(served.values()):]) == Counter(shard1)
    assert {n: t for n, t in mtimes.items() if n != "00001.tar"} == {
        p.name: p.stat().st_mtime_ns for p in out.glob("*.tar") if p.name != "00001.tar"
    }
    assert tar_samples(out).keys() == samples.keys()
    assert (s2.written, s2.failed, s2.shards_new) == (s.written, s.failed, 1)

    # other inputs or settings into the same folder: refused, since shard numbers would name other URLs
    with pytest.raises(FetchError, match="fetched with other shard_size"):
        fetch(str(tmp_path / "urls" / "*.parquet"), out, **{**args, "shard_size": 4})


def test_fetch_refuses_file_urls_before_downloading(tmp_path):
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.jpg", " FILE:///etc/hostname"], "org_caption": ["a", "b"],
                             "re_caption": ["a", "b"]}), tmp_path / "urls.parquet")  # fmt: skip
    with pytest.raises(FetchError, match=r"row 1 has a file: URL .*remove such rows"):
        fetch(tmp_path / "urls.parquet", tmp_path / "out")
    assert not (tmp_path / "out" / "_fetch" / "manifest.json").exists()  # nothing recorded: fixed inputs can use the folder


def test_fetch_without_img2dataset_says_what_to_install(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from pipeline.cli import app

    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.jpg"], "org_caption": ["a"], "re_caption": ["b"]}), tmp_path / "u.parquet")
    monkeypatch.setitem(sys.modules, "img2dataset", None)  # import img2dataset -> ImportError
    result = CliRunner().invoke(app, ["fetch", str(tmp_path / "u.parquet"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "needs img2dataset" in result.output and "pip install 'megasynth[fetch]'" in result.output


def test_fetch_that_downloads_nothing_fails_with_the_reasons(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    dead = [f"http://127.0.0.1:{closed_port()}/a.jpg", "not a url"]
    pq.write_table(pa.table({"url": dead, "org_caption": ["a", "b"], "re_caption": ["c", "d"]}), tmp_path / "u.parquet")
    cli = ["fetch", str(tmp_path / "u.parquet"), "--out", str(tmp_path / "out"), "--processes", "1", "--threads", "2", "--timeout", "1"]
    result = CliRunner().invoke(app, cli)
    assert result.exit_code == 2, result.output
    assert "no image was downloaded from 2 URLs" in result.output
    assert "unreachable" in result.output and "bad_url" in result.output
