"""kNN backends against a brute-force numpy reference: exact ones identical, approximate ones above their recall bound."""

from __future__ import annotations

import threading
from fractions import Fraction

import faiss
import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, load_config
from stages.knn import device as knn_device
from stages.knn import faiss_index
from stages.knn.exact import exact_search, pack, unpack
from stages.knn.rescore import Rescorer
from stages.knn.stream import prefetch
from stages.knn.torch_exact import TorchExact, compute_dtype
from stages.search import SearchSettings


@pytest.fixture(autouse=True)
def one_faiss_thread():
    """faiss's OpenMP barriers crawl when another process holds one of two cores; the stage sets its own threads too."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    """Random unit vectors as stored by embed: float16."""
    x = np.random.default_rng(seed).standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def clustered(n: int, d: int, clusters: int, spread: float, seed: int) -> np.ndarray:
    """Unit vectors around `clusters` centres: the neighbourhood structure real embeddings have."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    x = centres[rng.integers(clusters, size=n)] + spread * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def split(base: np.ndarray, sizes: list[int]) -> list[tuple[int, np.ndarray]]:
    cuts = np.cumsum(sizes)[:-1]
    return list(enumerate(np.split(base, cuts)))


def to_global(labels: np.ndarray, sizes: list[int]) -> np.ndarray:
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    shard, row = unpack(labels)
    return np.where(labels >= 0, offsets[np.clip(shard, 0, len(sizes) - 1)] + row, -1)


def brute_force(queries: np.ndarray, base: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact scores (float64 products of float16 values are exact) and rows, score descending then row."""
    scores = queries.astype(np.float64) @ base.astype(np.float64).T
    order = np.lexsort((np.broadcast_to(np.arange(len(base)), scores.shape), -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1).astype(np.float32), order


def rescored_top(queries: np.ndarray, shards: list[tuple[int, np.ndarray]], labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """What the mine stage does with any backend's candidates: exact scores, then (score, label) order, cut at k."""
    scores = np.full(labels.shape, -np.inf, np.float32)
    rescorer = Rescorer(queries)
    for i, vectors in shards:
        qi, ci = np.nonzero((labels >= 0) & (unpack(labels)[0] == i))
        scores[qi, ci] = rescorer.scores(vectors, qi, unpack(labels[qi, ci])[1])
    order = np.lexsort((labels, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(labels, order, 1)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


SIZES = [100, 1, 0, 150, 49]  # unequal shards, a one-row shard and an empty one


def torch_search(**kw):
    return lambda q, shards, k: TorchExact(**kw).search(q, shards, k)


EXACT = {
    "faiss-flat": lambda q, shards, k: exact_search(q, shards, k, query_block=7),
    "torch-fp32-small-tiles": torch_search(query_block=7, base_block=13),
    "torch-fp32-one-tile": torch_search(query_block=4096, base_block=4096),
}


@pytest.mark.parametrize("backend", sorted(EXACT))
def test_exact_backends_match_brute_force(backend):
    base = unit_rows(sum(SIZES), 16, seed=0)
    queries = base[:40]
    D, L = EXACT[backend](queries, split(base, SIZES), 10)
    ref_d, ref_rows = brute_force(queries, base, 10)
    assert (to_global(L, SIZES) == ref_rows).all()
    np.testing.assert_allclose(D, ref_d, rtol=1e-5)


@pytest.mark.parametrize("backend", sorted(EXACT))
def test_how_the_base_is_sharded_does_not_change_results(backend):
    base = unit_rows(300, 16, seed=1)
    queries = unit_rows(25, 16, seed=2)
    _, one = EXACT[backend](queries, split(base, [300]), 12)
    _, many = EXACT[backend](queries, split(base, [7] * 42 + [6]), 12)
    assert (to_global(many, [7] * 42 + [6]) == one).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_exact_candidates_rescored_are_the_exact_top_k(dtype):
    """float16 / bfloat16 scores are rounded; a margin of candidates, re-scored, gives the exact top-k, scores bit for bit."""
    base = clustered(400, 32, clusters=8, spread=0.4, seed=3)
    queries = base[::10]
    shards = split(base, [123, 200, 77])
    _, candidates = TorchExact(dtype=dtype, query_block=16, base_block=64).search(queries, shards, 10 + 8)
    D, L = rescored_top(queries, shards, candidates, 10)
    ref_d, ref_rows = brute_force(queries, base, 10)
    assert (to_global(L, [123, 200, 77]) == ref_rows).all()
    assert (D == ref_d).all()


def test_flat_and_torch_exact_agree_bit_for_bit_after_rescoring():
    base = clustered(500, 24, clusters=5, spread=0.3, seed=4)
    base[250:260] = base[240]  # exact duplicates: ties that only labels can order
    queries = base[::7]
    shards = split(base, [250, 250])
    faiss_top = rescored_top(queries, shards, exact_search(queries, shards, 20)[1], 12)
    torch_top = rescored_top(queries, shards, TorchExact(base_block=100).search(queries, shards, 20)[1], 12)
    assert all((a == b).all() for a, b in zip(faiss_top, torch_top))


def test_fewer_base_rows_than_k_and_no_queries():
    base = np.eye(3, dtype=np.float16)
    for search in EXACT.values():
        D, L = search(base, [(0, base), (1, base[:0])], 5)
        assert (L[:, 3:] == -1).all() and np.isneginf(D[:, 3:]).all()
        assert (L[:, 0] == [0, 1, 2]).all()
        D, L = search(base[:0], [(0, base)], 5)
        assert D.shape == L.shape == (0, 5)


def test_rescorer_is_the_exact_inner_product_in_any_order():
    q, b = unit_rows(5, 64, seed=5), unit_rows(50, 64, seed=6)
    qi, rows = np.repeat(np.arange(5), 50), np.tile(np.arange(50), 5)
    got = Rescorer(q, chunk=33).scores(b, qi, rows)
    perm = np.random.default_rng(0).permutation(64)
    assert (Rescorer(q[:, perm]).scores(b[:, perm], qi, rows) == got).all()  # summation order does not matter
    for i in (0, 17, 249):
        exact = sum(Fraction(float(x)) * Fraction(float(y)) for x, y in zip(q[qi[i]], b[rows[i]]))
        assert got[i] == np.float32(float(exact))  # the one rounding is float64 -> float32


def build_and_load(tmp_path, factory: str, base: np.ndarray, sizes: list[int], params: str, train_size: int = 10_000):
    shards = split(base, sizes)
    index = faiss_index.build(factory, base.shape[1], lambda: iter(shards), sizes, train_size, seed=0)
    path = tmp_path / "space.faiss"
    faiss_index.save(index, path, [f"s{i}" for i in range(len(sizes))], sizes, factory)
    return faiss_index.LoadedIndex(path, [f"s{i}" for i in range(len(sizes))], params)


# Measured on this data (3,000 vectors, d=32, 50 overlapping clusters), recall@10 against exact:
# IVF-Flat nprobe=4 of 32 lists 0.947; IVF-PQ (16 x 4 bits) nprobe=8 0.675, and 0.979 once 50
# candidates are re-scored exactly; HNSW16 efSearch=16 0.992. The bounds leave room for other
# BLAS or faiss versions.
APPROXIMATE = [
    ("IVF32,Flat", "nprobe=4", 0.90),
    ("IVF32,PQ16x4np", "nprobe=8", 0.60),
    ("HNSW16", "efSearch=16", 0.95),
]
SIZES_2 = [1000, 2000]


@pytest.fixture(scope="module")
def overlapping():
    base = clustered(3000, 32, clusters=50, spread=1.0, seed=7)
    queries = base[::25]
    return base, queries, brute_force(queries, base, 10)[1]


@pytest.mark.parametrize("factory,params,bound", APPROXIMATE)
def test_approximate_indexes_recall_above_their_bound(tmp_path, overlapping, factory, params, bound):
    base, queries, truth = overlapping
    _, L = build_and_load(tmp_path, factory, base, SIZES_2, params).search(queries, 10, query_block=50)
    assert recall(to_global(L, SIZES_2), truth) >= bound


def test_pq_candidates_rescored_recover_the_exact_top_k(tmp_path, overlapping):
    base, queries, truth = overlapping
    _, candidates = build_and_load(tmp_path, "IVF32,PQ16x4np", base, SIZES_2, "nprobe=8").search(queries, 10 + 40)
    _, L = rescored_top(queries, split(base, SIZES_2), candidates, 10)
    assert recall(to_global(L, SIZES_2), truth) >= 0.95


def test_ivf_probing_every_list_is_exact(tmp_path):
    base = clustered(1200, 16, clusters=10, spread=0.5, seed=8)
    loaded = build_and_load(tmp_path, "IVF8,Flat", base, [600, 600], "nprobe=8")
    _, L = loaded.search(base[::9], 10)
    assert (to_global(L, [600, 600]) == brute_force(base[::9], base, 10)[1]).all()


def test_training_sample_is_seeded_and_spans_every_shard():
    base = unit_rows(1000, 8, seed=9)
    shards = split(base, [300, 700])
    a = faiss_index.training_sample(iter(shards), [300, 700], 100, seed=1)
    assert (a == faiss_index.training_sample(iter(shards), [300, 700], 100, seed=1)).all()
    assert not (a == faiss_index.training_sample(iter(shards), [300, 700], 100, seed=2)).all()
    rows = {tuple(r) for r in base.astype(np.float32)}
    assert len(a) == 100 and all(tuple(r) in rows for r in a)
    assert len(faiss_index.training_sample(iter(shards), [300, 700], 5000, seed=1)) == 1000


def test_training_on_too_few_vectors_names_the_settings():
    base = unit_rows(50, 8, seed=10)
    with pytest.raises(ValueError, match=r"mine.index 'IVF64,Flat' could not be trained on 50 vectors \(mine.train_size"):
        faiss_index.build("IVF64,Flat", 8, lambda: iter([(0, base)]), [50], 10_000, seed=0)


def test_loaded_index_refuses_other_shards(tmp_path):
    base = unit_rows(100, 8, seed=11)
    build_and_load(tmp_path, "HNSW8", base, [100], "")
    with pytest.raises(ValueError, match="built on other shards"):
        faiss_index.LoadedIndex(tmp_path / "space.faiss", ["other"])
    with pytest.raises(FileNotFoundError, match="index unit has not run"):
        faiss_index.LoadedIndex(tmp_path / "missing.faiss", ["s0"])


@pytest.mark.parametrize(
    "overrides,key,words",
    [
        (["mine.index=IVF16,Flta"], "mine.index", "could not parse code description Flta"),
        (["mine.index=IDMap,Flat"], "mine.index", "leave out IDMap"),
        (["mine.index=IVF16,Flat", "mine.search_params=efSearch=3"], "mine.search_params", "could not set parameter efSearch"),
        (["mine.index=HNSW32", "mine.search_params=nprobe"], "mine.search_params", "could not interpret"),
        (["mine.backend=torch-exact", "mine.index=HNSW32"], "mine.index", "applies to backend faiss"),
        (["mine.backend=torch-exact", "mine.search_params=nprobe=3"], "mine.search_params", "applies to backend faiss"),
        (["mine.dtype=float16"], "mine.dtype", "applies to backend torch-exact"),
        (["mine.backend=annoy"], "mine.backend", "faiss"),
    ],
)
def test_config_errors_name_the_key(overrides, key, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    line = next(x for x in str(e.value).splitlines() if x.strip().startswith(key))
    assert words in line and len(str(e.value).splitlines()) == 2


def test_valid_backend_settings_load():
    cfg = load_config(None, ["mine.index=OPQ16_64,IVF4096,PQ16", "mine.search_params=nprobe=64"]).mine
    assert cfg.index == "OPQ16_64,IVF4096,PQ16"
    assert load_config(None, ["mine.backend=torch-exact", "mine.dtype=bfloat16"]).mine.dtype == "bfloat16"


def test_devices_resolve_to_what_this_machine_has():
    expect_torch = "cuda" if torch.cuda.is_available() else "cpu"
    assert knn_device.resolve("auto", "torch-exact") == expect_torch
    assert knn_device.resolve("auto", "faiss") == ("cuda" if knn_device.faiss_gpus() else "cpu")
    assert knn_device.resolve("cpu", "faiss") == "cpu" and knn_device.resolve("cuda", "faiss") == "cuda"
    assert compute_dtype("auto", "cpu") == torch.float32 and compute_dtype("auto", "cuda") == torch.float16
    if not knn_device.faiss_gpus():
        with pytest.raises(ValueError, match="mine.device=cuda with mine.backend=faiss needs faiss built with GPU support"):
            knn_device.faiss_gpu_resources()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="mine.device=cuda but torch sees no CUDA device"):
            TorchExact(device="cuda")


def test_prefetch_keeps_order_raises_and_stops():
    assert list(prefetch(iter(range(50)), depth=3)) == list(range(50))

    def failing():
        yield 1
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(prefetch(failing()))
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    stream = prefetch(endless(), depth=2)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    stream.close()  # the consumer stops early: the producer thread must end, not block forever
    assert not any(t.name == "knn-prefetch" for t in threading.enumerate())
    assert len(produced) <= 3 + 2 + 1


def test_pack_round_trips():
    rows = np.array([0, 5, 2**32 - 1, -1])
    labels = pack(7, rows)
    shard, back = unpack(labels[:3])
    assert (shard == 7).all() and (back == rows[:3]).all() and labels[3] == -1
    assert SearchSettings().index == "Flat" and faiss.METRIC_INNER_PRODUCT == faiss_index.METRIC


def test_a_cpu_and_a_gpu_faiss_wheel_together_are_refused():
    from stages.knn import faiss_wheel_conflict

    assert faiss_wheel_conflict(["numpy", "faiss-cpu"]) is None and faiss_wheel_conflict(["faiss-gpu-cu12"]) is None
    line = faiss_wheel_conflict(["faiss-cpu", "torch", "Faiss-GPU-cu12"])
    assert line.startswith("faiss-cpu and faiss-gpu-cu12 are installed together") and "pip uninstall -y faiss-cpu faiss-gpu-cu12" in line
