"""Embeddings on disk, written by embed: `{space}/{shard}.npz` per space and catalog shard.

Each file holds `ids` (catalog ids), `hashes` (first 64 bits of the image's sha256, so
exact duplicates can be told apart without the catalog) and fp16 L2-normalised `vectors`,
rows in catalog order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stages.base import atomic_path


def space_file(folder: Path, space: str, shard: str) -> Path:
    return Path(folder) / space / f"{shard}.npz"


def spaces(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if p.is_dir()) if Path(folder).is_dir() else []


def shards(folder: Path, space: str) -> list[str]:
    return sorted(p.stem for p in (Path(folder) / space).glob("*.npz") if not p.name.startswith("."))


def hash64(sha256_hex: str) -> int:
    return int(sha256_hex[:16], 16)


def write_manifest(folder: Path, space: str, manifest: dict) -> None:
    """`{space}/space.json`: which model made the space, and its `dim`. Every unit asks for the same
    bytes; they are written (atomically, with fsync) only when the file is absent or differs."""
    import json

    from stages.base import write_bytes_atomic

    path = Path(folder) / space / "space.json"
    data = json.dumps(manifest, sort_keys=True).encode()
    try:
        if path.read_bytes() == data:
            return
    except FileNotFoundError:
        pass
    write_bytes_atomic(path, data)


def read_manifest(folder: Path, space: str) -> dict | None:
    """One space's `space.json`, or None where embed wrote none."""
    import json

    path = Path(folder) / space / "space.json"
    return json.loads(path.read_text()) if path.is_file() else None


def read_manifests(folder: Path) -> dict[str, dict]:
    return {s: m for s in spaces(folder) if (m := read_manifest(folder, s)) is not None}


def save(folder: Path, space: str, shard: str, ids: np.ndarray, hashes: np.ndarray, vectors: np.ndarray) -> None:
    with atomic_path(space_file(folder, space, shard)) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, ids=np.asarray(ids).astype(str), hashes=np.asarray(hashes, dtype=np.uint64), vectors=np.asarray(vectors, dtype=np.float16))


def load(folder: Path, space: str, shard: str, fields: tuple[str, ...] = ("ids", "hashes", "vectors")) -> tuple[np.ndarray, ...]:
    with np.load(space_file(folder, space, shard), allow_pickle=False) as z:
        return tuple(z[f] for f in fields)
