"""fetch: URL tables (Recap-DataComp-1B's parquet files) to the WebDataset shards ingest reads, through img2dataset.

img2dataset downloads, resizes and writes per shard `NNNNN.tar` (`{key}.jpg`, `{key}.txt` with the caption,
`{key}.json` with every kept column plus its own status, sizes and sha256), beside it `NNNNN.parquet` with
every URL's status and error, and `NNNNN_stats.json`, which marks the shard done (its incremental mode skips
such shards on a rerun). This module stages the inputs under the names ingest reads, calls img2dataset once,
and reads those files back into one summary, so that no URL goes missing without a reason.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Recap-DataComp-1B's published columns (its dataset card): url, re_caption, org_caption, sha256, key,
# re_clip_score, org_clip_score, re_length, org_length, re_gpt4v_score, org_gpt4v_score.
URL_COL = "url"
CAPTION_COL = "org_caption"
RE_CAPTION_COL = "re_caption"

# Names img2dataset refuses in save_additional_columns (it writes its own under them), and ours.
RESERVED = frozenset({"key", "caption", "url", "width", "height", "original_width", "original_height", "status",
                      "error_message", "exif", "md5", "sha256", "sha512", "re_caption"})  # fmt: skip
RESIZE_MODES = ("keep_ratio", "keep_ratio_largest", "center_crop", "border", "no")
SHARD_DIGITS = 5  # img2dataset's oom_shard_count: shard names 00000, 00001, ...
STATE = "_fetch"  # under the output folder: the staged URL tables and the manifest (no *.json at the top:
# img2dataset takes every top-level *.json for a shard's stats file)


class FetchError(RuntimeError):
    """Inputs or an output folder that fetch cannot use as given: one line saying what to change."""


@dataclass
class FetchSummary:
    out: str
    urls: int  # rows of the input tables
    written: int  # images in the shards
    failed: dict[str, int] = field(default_factory=dict)  # reason -> URLs
    examples: dict[str, str] = field(default_factory=dict)  # reason -> one of img2dataset's messages for it
    not_done: int = 0  # URLs of shards that have not finished: a rerun retries them
    unaccounted: int = 0  # URLs of finished shards missing from their status file (img2dataset dropped them)
    shards: int = 0  # shards the inputs make
    shards_done: int = 0
    shards_new: int = 0  # finished by this call
    incomplete: list[str] = field(default_factory=list)  # shards started and not finished
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def failure_reason(status: str, message: str | None) -> str:
    """A short reason for one URL that gave no image, from img2dataset's status and error message."""
    m = (message or "").strip()
    low = m.lower()
    if status == "failed_to_resize":
        if "decoding error" in low:
            return "undecodable"  # not an image: an HTML page, garbage or truncated bytes
        return {"image too small": "too_small", "image area too large": "too_large",
                "aspect ratio too large": "too_elongated"}.get(low, "resize_error")  # fmt: skip
    http = re.match(r"http error (\d{3})", low)
    if http:
        return f"http_{http.group(1)}"
    if "timed out" in low:
        return "timeout"
    if "x-robots-tag" in low:
        return "disallowed_by_site"
    if low == "hash mismatch":
        return "hash_mismatch"
    if low.startswith("unknown url type"):
        return "bad_url"
    if low.startswith("<urlopen error"):
        return "unreachable"  # refused, no such host, TLS failure
    return "download_error"


def column_map(names: list[str], url_col: str = URL_COL, caption_col: str | None = CAPTION_COL,
               re_caption_col: str | None = RE_CAPTION_COL, keep: list[str] | None = None,
               verify_hash: str | None = None) -> dict[str, str]:  # fmt: skip
    """Source column -> its name in each sample's json. The caption becomes `caption` and the re-caption
    `re_caption` (ingest's caption_fields and re_caption_fields); a kept column whose name img2dataset
    reserves gets a `source_` prefix (Recap's `key` -> `source_key`). `keep=None`: every other column."""
    roles = [(c, name) for c, name in ((url_col, "url"), (caption_col, "caption"), (re_caption_col, "re_caption"),
                                       (verify_hash, "sha256")) if c]  # sha256: img2dataset checks the bytes against it
    if len({c for c, _ in roles}) < len(roles):
        raise FetchError(f"one column in two roles: url {url_col!r}, caption {caption_col!r}, re-caption {re_caption_col!r}, hash {verify_hash!r}")
    wanted = dict(roles)
    missing = [c for c in [*wanted, *(keep or [])] if c not in names]
    if missing:
        raise FetchError(f"no column {', '.join(map(repr, missing))} in the URL table (columns: {', '.join(names)}); "
                         "set --url-col / --caption-col / --re-caption-col / --keep")  # fmt: skip
    out = dict(wanted)
    for c in names if keep is None else keep:
        if c not in out:
            out[c] = f"source_{c}" if c in RESERVED else c
    return out


def fetch(urls: list[str] | str, out: str | Path, *, url_col: str = URL_COL, caption_col: str | None = CAPTION_COL,
          re_caption_col: str | None = RE_CAPTION_COL, keep: list[str] | None = None, verify_hash: str | None = None,
          image_size: int = 512, resize_mode: str = "keep_ratio", upscale: bool = False, shard_size: int = 10_000,
          processes: int | None = None, threads: int = 64, timeout: int = 10, retries: int = 0) -> FetchSummary:  # fmt: skip
    """Download every URL of `urls` (parquet files, globs, braces) into WebDataset shards under `out`, through
    img2dataset; a rerun into the same folder downloads only the shards that have not finished."""
    from stages.corpus.readers import CorpusError, expand_paths

    start = time.monotonic()
    if resize_mode not in RESIZE_MODES:
        raise FetchError(f"resize mode {resize_mode!r}: expected one of {', '.join(RESIZE_MODES)}")
    try:
        inputs = [os.path.abspath(p) for p in expand_paths([urls] if isinstance(urls, (str, Path)) else list(urls))]
    except CorpusError as e:
        raise FetchError(str(e)) from None
    not_parquet = [p for p in inputs if not p.endswith(".parquet")]
    if not_parquet:
        raise FetchError(f"{not_parquet[0]}: fetch reads parquet URL tables (Recap-DataComp's data/train_data/*.parquet)")
    out = Path(out).resolve()
    columns = _columns(inputs, url_col, caption_col, re_caption_col, keep, verify_hash)
    image = {"image_size": image_size, "resize_mode": resize_mode, "upscale": upscale}
    manifest = _manifest(out, inputs, columns, shard_size, image)
    if not (out / STATE / "manifest.json").is_file():  # written once the inputs are staged: a failed first try leaves none
        shutil.rmtree(out / STATE, ignore_errors=True)
    staged = _stage(out, inputs, columns)
    _write_manifest(out, manifest)
    done_before = _done_shards(out)
    _download(
        url_list=str(staged), output_folder=str(out), input_format="parquet", output_format="webdataset",
        url_col="url", caption_col="caption" if caption_col else None,
        save_additional_columns=[n for n in columns.values() if n not in ("url", "caption", "sha256")] or None,
        verify_hash=["sha256", "sha256"] if verify_hash else None, compute_hash="sha256",
        image_size=image_size, resize_mode=resize_mode, resize_only_if_bigger=not upscale, encode_format="jpg",
        encode_quality=95, number_sample_per_shard=shard_size, oom_shard_count=SHARD_DIGITS,
        processes_count=processes or os.cpu_count() or 1, thread_count=threads, timeout=timeout, retries=retries,
        incremental_mode="incremental", enable_wandb=False,
        user_agent_token="img2dataset",  # so X-Robots-Tag directives addressed to img2dataset are obeyed
    )  # fmt: skip
    summary = _summarize(out, manifest)
    summary.shards_new = len(_done_shards(out) - done_before)
    summary.seconds = round(time.monotonic() - start, 2)
    return summary


def summarize(out: str | Path) -> FetchSummary:
    """What a fetch folder holds: URLs in, images written, failures by reason, shards not finished."""
    out = Path(out).resolve()
    path = out / STATE / "manifest.json"
    if not path.is_file():
        raise FetchError(f"{out} is not a megasynth fetch folder (no {STATE}/manifest.json)")
    return _summarize(out, json.loads(path.read_text()))


def _columns(inputs: list[str], url_col, caption_col, re_caption_col, keep, verify_hash) -> dict[str, str]:
    """One column map for every input: img2dataset selects the same columns from each table."""
    import pyarrow.parquet as pq

    first = pq.read_schema(inputs[0]).names
    columns = column_map(first, url_col, caption_col, re_caption_col, keep, verify_hash)
    for path in inputs[1:]:
        missing = [c for c in columns if c not in pq.read_schema(path).names]
        if missing:
            raise FetchError(f"{path}: no column {', '.join(map(repr, missing))}, which {inputs[0]} has; "
                             "pass the columns every table has with --keep")  # fmt: skip
    return columns


def _manifest(out: Path, inputs: list[str], columns: dict[str, str], shard_size: int, image: dict) -> dict:
    """The inputs and settings this folder's shards come from. A rerun must match them: img2dataset numbers
    shards by row counts, so other inputs would make a done shard stand for other URLs."""
    import pyarrow.parquet as pq

    manifest = {
        "inputs": [{"path": p, "size": os.path.getsize(p), "rows": pq.ParquetFile(p).metadata.num_rows} for p in inputs],
        "columns": columns,
        "shard_size": shard_size,
        "image": image,
    }
    path = out / STATE / "manifest.json"
    if path.is_file():
        before = json.loads(path.read_text())
        changed = [k for k in manifest if before.get(k) != manifest[k]]
        if changed:
            raise FetchError(f"{out} was fetched with other {' and '.join(changed)}: a rerun resumes only the same "
                             "inputs and settings; use another --out")  # fmt: skip
    elif out.is_dir() and any(out.glob("*_stats.json")):
        raise FetchError(f"{out} holds shards that megasynth fetch did not write (no {STATE}/manifest.json); use another --out")
    return manifest


def _write_manifest(out: Path, manifest: dict) -> None:
    path = out / STATE / "manifest.json"
    if path.is_file():
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, path)


def _stage(out: Path, inputs: list[str], columns: dict[str, str]) -> Path:
    """Copies of the inputs with only the columns kept, under the names of `columns`, in the inputs' order;
    written once (a rerun reuses them)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    folder = out / STATE / "urls"
    folder.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(inputs):
        target = folder / f"{i:05d}.parquet"
        if target.is_file():
            continue
        tmp = target.with_suffix(".tmp")
        pf = pq.ParquetFile(path)
        writer = None
        row = 0
        for batch in pf.iter_batches(batch_size=65_536, columns=list(columns)):
            table = pa.Table.from_batches([batch]).rename_columns([columns[c] for c in batch.schema.names])
            url = table["url"].cast(pa.string())
            local = pc.starts_with(pc.utf8_lower(pc.utf8_trim_whitespace(url)), "file:")
            if pc.any(local).as_py():
                first = pc.index(local, True).as_py()
                raise FetchError(f"{path}: row {row + first} has a file: URL ({url[first].as_py()}); img2dataset would copy "
                                 f"files of this machine into the shards: remove such rows")  # fmt: skip
            writer = writer or pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
            row += table.num_rows
        if writer is None:  # no rows: an empty table keeps the shard numbering of the inputs after it
            pq.write_table(pa.table({n: pa.array([], pa.string()) for n in columns.values()}), tmp)
        else:
            writer.close()
        os.replace(tmp, target)
    return folder


def _download(**kwargs) -> None:
    """img2dataset.download, imported here: `megasynth --help` stays fast and the rest works without it."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations asks PyPI for a newer version on import
    try:
        from img2dataset import download
    except ImportError as e:
        raise FetchError(f"megasynth fetch needs img2dataset, which does not import here ({e}): pip install 'megasynth[fetch]'") from None
    main_thread = threading.current_thread() is threading.main_thread()
    sigint = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        download(**kwargs)
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, sigint)  # img2dataset installs its own handler, which calls sys.exit


def _done_shards(out: Path) -> set[str]:
    return {p.name[: -len("_stats.json")] for p in out.glob("*_stats.json")}


def _shard_rows(manifest: dict) -> list[int]:
    """URLs per shard, in shard order: img2dataset cuts each input table into shards of its own."""
    n = manifest["shard_size"]
    return [min(n, i["rows"] - j * n) for i in manifest["inputs"] for j in range(math.ceil(i["rows"] / n))]


def _summarize(out: Path, manifest: dict) -> FetchSummary:
    import pyarrow.parquet as pq

    rows = _shard_rows(manifest)
    done = _done_shards(out)
    s = FetchSummary(out=str(out), urls=sum(i["rows"] for i in manifest["inputs"]), written=0, shards=len(rows))
    failed: Counter = Counter()
    for shard_id, expected in enumerate(rows):
        name = f"{shard_id:0{SHARD_DIGITS}d}"
        if name not in done:
            s.not_done += expected
            if (out / f"{name}.tar").exists() or (out / f"{name}.parquet").exists():
                s.incomplete.append(name)
            continue
        s.shards_done += 1
        status = pq.read_table(out / f"{name}.parquet", columns=["status", "error_message"]).to_pydict()
        s.unaccounted += expected - len(status["status"])
        for st, message in zip(status["status"], status["error_message"]):
            if st == "success":
                s.written += 1
                continue
            reason = failure_reason(st, message)
            failed[reason] += 1
            s.examples.setdefault(reason, message or st)
    s.failed = dict(failed.most_common())
    return s


def summary_table(s: FetchSummary):
    """The summary as a rich table: counts first, then each failure reason with one of img2dataset's messages."""
    from rich.table import Table

    t = Table(title=f"fetch: {s.out}", show_header=True)
    t.add_column("")
    t.add_column("URLs", justify="right")
    t.add_column("img2dataset's message")
    t.add_row("in", str(s.urls), "")
    t.add_row("images written", str(s.written), "")
    for reason, n in s.failed.items():
        t.add_row(f"failed: {reason}", str(n), s.examples.get(reason, ""))
    if s.not_done:
        t.add_row("not finished", str(s.not_done), f"{s.shards - s.shards_done} of {s.shards} shards" + (f" ({len(s.incomplete)} started)" if s.incomplete else ""))
    if s.unaccounted:
        t.add_row("missing from status files", str(s.unaccounted), "img2dataset dropped them: see its log")
    t.caption = f"{s.shards_done} of {s.shards} shards done, {s.shards_new} by this call, in {s.seconds:.1f} s"
    return t
