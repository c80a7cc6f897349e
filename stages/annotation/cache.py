"""A cache of raw generated answers, so a rerun or a second config sharing a step never pays twice.

Key: what decides an answer — the step, the generator's `answer_fingerprint()` (model,
sampling, and each backend's settings that change answers: dtype, server, ...), the
rendered prompt (which folds in the pair's captions, WORD_NUM and demonstrations, and the
prompt version), the image bytes, and the request's seed. Raw answers are cached, not
validated ones, so a stricter validator re-judges them for free.

Layout: `{folder}/answers/{digest}.parquet`, one file per `put_many` (the new answers of one
chunk and step), written under a temporary name and renamed into place, never changed after.
A file is whole or absent, so the workers of many nodes write into one folder on a shared
filesystem at once without locks (rename is atomic there; SQLite's locking is not), and any
of them reads every file. A reader keeps an index of 12 bytes per answer (a 64-bit key
prefix and a file number) and reads an answer from its file when asked for it; a key it
does not know makes it list the folders again, to see what other workers wrote since.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from stages.annotation.backends import ChatRequest
from stages.base import TMP_MARK, is_transient, write_bytes_atomic

log = logging.getLogger("megasynth.annotate")

ANSWERS = "answers"  # the sub-folder of a cache folder that holds its answer files
MAX_SEGMENTS = 16  # sorted index segments kept before they are merged into one


def request_key(step: str, generator: dict, req: ChatRequest) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"step": step, "generator": generator, "text": req.text, "seed": req.seed}, sort_keys=True).encode())
    for img in req.images:
        h.update(_image_digest(img))
    return h.hexdigest()


def _image_digest(img: Image.Image) -> bytes:
    digest = img.info.get("megasynth_digest")  # set by whoever decoded the image from known bytes
    if digest:
        return digest.encode()
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return hashlib.sha256(buf.getvalue()).digest()


def key_prefixes(keys: Sequence[str]) -> np.ndarray:
    """The first 64 bits of each hex key: the index's sort key (a collision only costs a file read)."""
    return np.frombuffer(bytes.fromhex("".join(k[:16] for k in keys)), dtype=">u8").astype(np.uint64)


def encode_answers(items: dict[str, str]) -> bytes:
    """The bytes of one answer file: keys sorted, zstd-compressed parquet."""
    keys = sorted(items)
    table = pa.table({"key": pa.array(keys, pa.string()), "answer": pa.array([items[k] for k in keys], pa.string())})
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue().to_pybytes()


def answer_files(folder: Path) -> list[Path]:
    """The finished answer files of one `answers/` folder, by name (temporary files are someone's write in progress)."""
    try:
        names = sorted(e.name for e in os.scandir(folder) if e.name.endswith(".parquet") and not e.name.startswith(TMP_MARK))
    except FileNotFoundError:
        return []
    return [folder / n for n in names]


class AnswerCache:
    """Answers shared through a folder of immutable files; `read_also`: other caches, read and never written."""

    def __init__(self, folder: Path | str, read_also: Iterable[Path | str] = ()):
        self.folder = Path(folder) / ANSWERS
        self.folder.mkdir(parents=True, exist_ok=True)
        self.sources = [self.folder, *(Path(f) / ANSWERS for f in read_also if Path(f) / ANSWERS != self.folder)]
        self.files: list[Path] = []
        self._known_files: set[str] = set()
        self._segments: list[tuple[np.ndarray, np.ndarray]] = []  # (sorted key prefixes, file numbers)
        for f in (Path(folder), *map(Path, read_also)):
            if (f / "annotate.sqlite").exists():
                log.warning("%s: answers cached by an older megasynth in annotate.sqlite are not read; they are asked again", f)
        self.refresh()

    def __len__(self) -> int:
        return sum(len(p) for p, _ in self._segments)

    def get_many(self, keys: list[str]) -> dict[str, str]:
        found = self._lookup(keys)
        if len(found) < len(set(keys)) and self.refresh():  # another worker may have answered them meanwhile
            found = self._lookup(keys)
        return found

    def put_many(self, items: dict[str, str]) -> None:
        """Write `items` as one new file; answers that cannot be stored as UTF-8 are left out (asked again next time)."""
        items = {k: v for k, v in items.items() if _storable(k, v)}
        if not items:
            return
        data = encode_answers(items)
        path = self.folder / f"{hashlib.sha256(data).hexdigest()[:32]}.parquet"  # the same answers, the same name
        write_bytes_atomic(path, data)
        self._add(path, list(items))

    def refresh(self) -> bool:
        """Index the files written since the last look; True if there were any."""
        new = [p for src in self.sources for p in answer_files(src) if str(p) not in self._known_files]
        for path in new:
            try:
                keys = pq.read_table(path, columns=["key"]).column("key").to_pylist()
            except (pa.ArrowException, OSError) as e:
                if isinstance(e, OSError) and is_transient(e):
                    raise
                log.warning("answer cache: %s is unreadable and is skipped (%s: %s)", path, type(e).__name__, e)
                self._known_files.add(str(path))
                continue
            self._add(path, keys)
        return bool(new)

    def close(self) -> None:
        self._segments.clear()

    def _add(self, path: Path, keys: list[str]) -> None:
        if str(path) in self._known_files:
            return
        self._known_files.add(str(path))
        self.files.append(path)
        prefixes = key_prefixes(keys)
        order = np.argsort(prefixes, kind="stable")
        self._segments.append((prefixes[order], np.full(len(keys), len(self.files) - 1, dtype=np.uint32)))
        if len(self._segments) > MAX_SEGMENTS:
            prefixes = np.concatenate([p for p, _ in self._segments])
            files = np.concatenate([f for _, f in self._segments])
            order = np.argsort(prefixes, kind="stable")
            self._segments = [(prefixes[order], files[order])]

    def _lookup(self, keys: list[str]) -> dict[str, str]:
        if not keys or not self._segments:
            return {}
        wanted: dict[int, set[str]] = {}
        prefixes = key_prefixes(keys)
        for sorted_prefixes, file_of in self._segments:
            lo = np.searchsorted(sorted_prefixes, prefixes, "left")
            hi = np.searchsorted(sorted_prefixes, prefixes, "right")
            for i in np.nonzero(hi > lo)[0]:
                for j in range(lo[i], hi[i]):
                    wanted.setdefault(int(file_of[j]), set()).add(keys[i])
        found: dict[str, str] = {}
        for f in sorted(wanted):  # a key answered twice (two workers at once) gets the answer indexed first, every time
            for k, v in self._read(self.files[f], wanted[f]).items():
                found.setdefault(k, v)
        return found

    def _read(self, path: Path, keys: set[str]) -> dict[str, str]:
        try:
            table = pq.read_table(path, filters=[("key", "in", sorted(keys))])
        except pa.ArrowException as e:
            log.warning("answer cache: %s is unreadable and is skipped (%s: %s)", path, type(e).__name__, e)
            return {}
        return dict(zip(table.column("key").to_pylist(), table.column("answer").to_pylist()))


def _storable(key: str, answer: str) -> bool:
    try:
        answer.encode("utf-8")
    except UnicodeEncodeError:
        log.warning("answer cache: an answer for %s holds text that is not valid Unicode and is not cached", key[:12])
        return False
    return True


def reused_cache(run: Path, section: str = "annotate") -> Path:
    """The answer cache folder of another run folder for one of its stages (a config section with a `cache_dir`):
    that `cache_dir` if the run set one, else the run's cache/."""
    import yaml

    try:
        cache_dir = ((yaml.safe_load((Path(run) / "config.yaml").read_text()) or {}).get(section) or {}).get("cache_dir")
    except FileNotFoundError:
        cache_dir = None
    return Path(cache_dir).expanduser() if cache_dir else Path(run) / "cache"
