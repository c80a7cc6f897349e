"""A cache of raw generated answers, so a rerun or a second config sharing a step never pays twice.

Key: what decides an answer — the step, the generator's `answer_fingerprint()` (model,
sampling, and each backend's settings that change answers: dtype, server, ...), the
rendered prompt (which folds in the pair's captions, WORD_NUM and demonstrations, and the
prompt version), the image bytes, and the request's seed. Raw answers are cached, not
validated ones, so a stricter validator re-judges them for free. SQLite in WAL mode lets
the workers of one machine share a file; give each node its own file on a cluster.
"""

from __future__ import annotations

import hashlib
import io
import json
import sqlite3
from pathlib import Path

from PIL import Image

from stages.annotation.backends import ChatRequest


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


class AnswerCache:
    def __init__(self, path: Path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, timeout=120, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, answer TEXT NOT NULL)")

    def get_many(self, keys: list[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            rows = self.db.execute(f"SELECT key, answer FROM answers WHERE key IN ({','.join('?' * len(chunk))})", chunk)
            found.update(rows.fetchall())
        return found

    def put_many(self, items: dict[str, str]) -> None:
        if items:
            with self.db:
                self.db.execute("BEGIN")
                self.db.executemany("INSERT OR REPLACE INTO answers (key, answer) VALUES (?, ?)", items.items())

    def close(self) -> None:
        self.db.close()
