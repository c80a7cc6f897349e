"""mine: every backend, the similarity band at its edges, the union over spaces, duplicates, hard negatives."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stages import catalog, embeddings, pairs
from stages.knn.exact import exact_search, unpack
from stages.mine import MineSettings, MineStage


def vec(first: float, d: int = 8, axis: int = 1) -> np.ndarray:
    """A vector whose inner product with e0 is exactly `first` (all values exact in fp16)."""
    v = np.zeros(d, np.float32)
    v[0] = first
    v[axis] = math.sqrt(max(0.0, 1 - first * first))
    return v


def make_inputs(tmp_path, shards: dict[str, list[tuple[str, str, dict[str, np.ndarray]]]]):
    """shards: name -> [(key, sha256 hex, {space: vector})]; writes a catalog and embeddings."""
    cat, emb = tmp_path / "catalog", tmp_path / "embeddings"
    cat.mkdir(parents=True, exist_ok=True)
    spaces = sorted({s for items in shards.values() for _, _, v in items for s in v})
    for shard, items in shards.items():
        rows = [
            {"id": f"{shard}/{k}", "shard": shard, "key": k, "sha256": h, "status": "ok", "width": 8, "height": 8}
            for k, h, _ in items
        ]
        catalog.write(cat / f"{shard}.parquet", rows)
        for space in spaces:
            have = [(f"{shard}/{k}", h, v[space]) for k, h, v in items if space in v]
            embeddings.save(
                emb, space, shard,
                np.array([i for i, _, _ in have]),
                np.array([embeddings.hash64(h) for _, h, _ in have], dtype=np.uint64),
                np.stack([x for _, _, x in have]) if have else np.zeros((0, 8)),
            )  # fmt: skip
    return {"catalog": cat, "embeddings": emb}


def run_mine(tmp_path, inputs, **settings) -> tuple[list[dict], object]:
    """Every wave of the stage, in order, as an executor runs it; returns the pairs and the query units' stats."""
    settings.setdefault("seed", 0)
    stage = MineStage(MineSettings(**settings), inputs, tmp_path / "pairs")
    total = None
    for wave in stage.plan():
        for unit in wave:
            s = stage.process(unit)
            if unit.id.startswith("queries-"):
                total = s if total is None else total.__iadd__(s)
    rows = [r for u in pairs.units(tmp_path / "pairs") for r in pairs.read(tmp_path / "pairs", u)]
    return sorted(rows, key=lambda r: r["pair_id"]), total


def h(n: int) -> str:
    """A fake sha256 hex digest; equal n, equal bytes."""
    return f"{n:016x}" + "0" * 48


def test_exact_search_matches_brute_force_across_shards():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((300, 16)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    queries = base[:40]
    D, L = exact_search(queries, [(0, base[:100]), (1, base[100:250]), (2, base[250:])], k=10, query_block=7)
    shard, row = unpack(L)
    got = np.where(shard == 0, row, np.where(shard == 1, 100 + row, 250 + row))
    ref = np.argsort(-(queries @ base.T), axis=1, kind="stable")[:, :10]
    assert (got == ref).all()
    np.testing.assert_allclose(D, np.take_along_axis(queries @ base.T, ref, 1), rtol=1e-6)


def test_fewer_base_rows_than_k():
    base = np.eye(3, dtype=np.float32)
    D, L = exact_search(base, [(0, base)], k=5)
    assert (L[:, 3:] == -1).all() and np.isneginf(D[:, 3:]).all()
    assert (L[:, 0] == [0, 1, 2]).all()


# Backends that must give the same pairs as faiss Flat. IVF probing every list searches exactly;
# IVF-PQ proposes approximate candidates that the exact re-scoring puts back in order.
EXACT_BACKENDS = {
    "faiss-flat": {},
    "torch-exact": {"backend": "torch-exact", "query_block": 3, "base_block": 5},
    "torch-exact-fp16": {"backend": "torch-exact", "dtype": "float16", "query_block": 16, "base_block": 32},
    "faiss-ivf-all-lists": {"index": "IVF2,Flat", "search_params": "nprobe=2"},
}


@pytest.mark.parametrize("backend", sorted(EXACT_BACKENDS))
def test_band_edges_duplicates_and_union(tmp_path, backend):
    e0 = vec(1.0)
    items = [
        ("q", h(1), {"a": e0, "b": e0}),
        ("at_lo", h(2), {"a": vec(0.75, axis=2)}),  # exactly lo: outside the open interval
        ("at_hi", h(3), {"a": vec(0.875, axis=3)}),  # exactly hi: a near-duplicate
        ("inside", h(4), {"a": vec(0.8125, axis=4), "b": vec(0.8125, axis=4)}),  # in band in both spaces
        ("below", h(5), {"a": vec(0.5, axis=5)}),
        ("same_bytes", h(1), {"a": vec(0.8125, axis=6)}),  # in band, but the query's exact duplicate
        ("only_b", h(6), {"b": vec(0.78125, axis=7)}),  # in band only under b's wider band
    ]
    inputs = make_inputs(tmp_path, {"s0": items})
    rows, stats = run_mine(tmp_path, inputs, k=6, band=(0.75, 0.875), bands={"b": (0.70, 0.875)}, pairs_per_query=10, hard_negatives=3, **EXACT_BACKENDS[backend])
    from_q = {r["target_id"].split("/")[1]: r for r in rows if r["query_id"] == "s0/q"}
    assert set(from_q) == {"inside", "only_b"}
    assert {s["space"]: s["score"] for s in from_q["inside"]["spaces"]} == {"a": 0.8125, "b": 0.8125}
    assert [s["space"] for s in from_q["only_b"]["spaces"]] == ["b"]
    negs = [n["id"].split("/")[1] for n in from_q["inside"]["hard_negatives"]]
    # hardest first; never the target, the query's duplicate or a near-duplicate of the query
    assert negs == ["only_b", "at_lo", "below"]
    assert stats.counters["exact_duplicates"] >= 1 and stats.counters["near_duplicates"] >= 1


@pytest.mark.parametrize("backend", sorted(EXACT_BACKENDS))
def test_query_without_in_band_neighbour_is_counted(tmp_path, backend):
    items = [("q", h(1), {"a": vec(1.0)}), ("far", h(2), {"a": vec(0.1, axis=2)})]
    rows, stats = run_mine(tmp_path, make_inputs(tmp_path, {"s0": items}), k=4, **EXACT_BACKENDS[backend])
    assert rows == []
    assert stats.input == 2 and stats.rejected["no_in_band_neighbour"] == 2


@pytest.mark.parametrize("backend", sorted(EXACT_BACKENDS))
def test_fewer_images_than_k(tmp_path, backend):
    items = [("q", h(1), {"a": vec(1.0)}), ("t", h(2), {"a": vec(0.8125, axis=2)}), ("n", h(3), {"a": vec(0.5, axis=3)})]
    rows, stats = run_mine(tmp_path, make_inputs(tmp_path, {"s0": items}), k=10, band=(0.75, 0.875), hard_negatives=4, **EXACT_BACKENDS[backend])
    from_q = [r for r in rows if r["query_id"] == "s0/q"]
    assert [r["target_id"] for r in from_q] == ["s0/t"]
    assert [n["id"] for n in from_q[0]["hard_negatives"]] == ["s0/n"]
    assert stats.counters["pairs_short_of_hard_negatives"] == len(rows)


def random_corpus(n_shards=3, per=30, d=8, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((6, d))
    shards = {}
    for s in range(n_shards):
        items = []
        for i in range(per):
            c = centres[rng.integers(6)]
            va, vb = (c + 0.35 * rng.standard_normal(d) for _ in range(2))
            items.append((f"k{i}", h(s * 1000 + i), {"a": va / np.linalg.norm(va), "b": vb / np.linalg.norm(vb)}))
        shards[f"s{s}"] = items
    return shards


@pytest.mark.parametrize("backend", ["faiss-flat", "torch-exact"])
def test_units_of_any_size_give_identical_pairs(tmp_path, backend):
    shards = random_corpus()
    settings = dict(k=10, band=(0.6, 0.98), pairs_per_query=2, hard_negatives=4, **EXACT_BACKENDS[backend])
    one, _ = run_mine(tmp_path / "one", make_inputs(tmp_path / "one", shards), queries_per_unit=1000, **settings)
    many, _ = run_mine(tmp_path / "many", make_inputs(tmp_path / "many", shards), queries_per_unit=7, **settings)
    assert one == many and len(one) > 20


@pytest.fixture(scope="module")
def corpus_inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corpus")
    return make_inputs(tmp, random_corpus(n_shards=4, per=40))


MINED = dict(k=10, band=(0.6, 0.98), pairs_per_query=2, hard_negatives=4)


@pytest.fixture(scope="module")
def flat_pairs(corpus_inputs, tmp_path_factory):
    rows, _ = run_mine(tmp_path_factory.mktemp("flat"), corpus_inputs, **MINED)
    assert len(rows) > 100
    return rows


@pytest.mark.parametrize(
    "settings",
    [
        EXACT_BACKENDS["torch-exact"],
        EXACT_BACKENDS["torch-exact-fp16"],
        {"backend": "torch-exact", "dtype": "bfloat16", "rerank": 16},
        {"index": "IVF4,Flat", "search_params": "nprobe=4"},
        {"index": "IVF4,PQ4x4np", "search_params": "nprobe=4", "rerank": 60},
    ],
    ids=["torch-fp32", "torch-fp16", "torch-bf16", "ivf-flat", "ivf-pq-reranked"],
)
def test_backends_give_the_pairs_of_exact_search(tmp_path, corpus_inputs, flat_pairs, settings):
    rows, _ = run_mine(tmp_path, corpus_inputs, **MINED, **settings)
    assert rows == flat_pairs


def test_approximate_index_pairs_carry_exact_scores(tmp_path, corpus_inputs, flat_pairs):
    """HNSW with a small efSearch misses neighbours (so draws differ), but every score it reports is exact and in band."""
    rows, _ = run_mine(tmp_path, corpus_inputs, **MINED, index="HNSW4", search_params="efSearch=4", rerank=0)
    vectors = {}
    for space in ("a", "b"):
        for shard in embeddings.shards(corpus_inputs["embeddings"], space):
            ids, _, v = embeddings.load(corpus_inputs["embeddings"], space, shard)
            vectors.update({(space, i): x for i, x in zip(ids, v.astype(np.float64))})
    for r in rows:
        for s in r["spaces"]:
            exact = np.float32(vectors[(s["space"], r["query_id"])] @ vectors[(s["space"], r["target_id"])])
            assert s["score"] == exact and 0.6 < s["score"] < 0.98
    assert len({r["query_id"] for r in rows}) >= 0.9 * len({r["query_id"] for r in flat_pairs})


def test_index_is_a_first_wave_and_query_units_need_it(tmp_path, corpus_inputs):
    stage = MineStage(MineSettings(seed=0, index="IVF4,Flat", search_params="nprobe=4", **MINED), corpus_inputs, tmp_path / "pairs")
    index_wave, query_wave = stage.plan()
    assert [u.id for u in index_wave] == ["index-a", "index-b"]
    assert all(u.id.startswith("queries-") for u in query_wave)
    with pytest.raises(FileNotFoundError, match="index unit has not run"):
        stage.process(query_wave[0])
    stats = stage.process(index_wave[0])
    assert stats.counters["indexed.a"] == 160 and stats.input == stats.output == 0
    assert sorted(p.name for p in (tmp_path / "pairs" / "index").iterdir()) == ["a.faiss", "a.faiss.json"]


@pytest.mark.parametrize("index", ["IVF4,PQ4x4np", "HNSW8"])
def test_index_build_gives_the_same_bytes(tmp_path, corpus_inputs, index):
    """HNSW is built on one thread whatever mine.cpus says: a parallel build's graph depends on timing."""
    built = []
    for run in ("one", "two"):
        stage = MineStage(MineSettings(seed=0, index=index, cpus=2, **MINED), corpus_inputs, tmp_path / run)
        stage.process(stage.plan()[0][0])
        built.append((tmp_path / run / "index" / "a.faiss").read_bytes())
    assert built[0] == built[1]


def test_plan_checks_the_index_at_the_spaces_dimension(tmp_path):
    inputs = make_inputs(tmp_path, {"s0": [("q", h(1), {"a": vec(1.0)})]})  # d = 8
    with pytest.raises(ValueError, match=r"mine.index: faiss cannot build 'IVF2,PQ3' at d=8: .*multiple.* \(space a\)"):
        MineStage(MineSettings(index="IVF2,PQ3"), inputs, tmp_path / "pairs").plan()


def test_resources_ask_for_a_gpu_only_when_mining_on_one(tmp_path):
    def gpus(**kw):
        return MineStage(MineSettings(**kw), {}, tmp_path).resources().gpus

    assert gpus(device="cuda") == 1.0 and gpus(device="cuda", backend="torch-exact") == 1.0
    assert gpus(device="cpu") == 0.0 and gpus(device="cuda", gpus=0.5) == 0.5
    assert MineStage.loads_model  # one worker per GPU keeps its device and loaded index across units


def test_query_sample_and_pairs_per_query_are_seeded(tmp_path):
    shards = random_corpus()
    inputs = make_inputs(tmp_path, shards)
    rows, stats = run_mine(tmp_path / "r1", inputs, k=10, band=(0.5, 0.99), queries=25, pairs_per_query=1)
    again, _ = run_mine(tmp_path / "r2", inputs, k=10, band=(0.5, 0.99), queries=25, pairs_per_query=1)
    assert rows == again
    assert stats.input == 25
    per_query = {}
    for r in rows:
        per_query[r["query_id"]] = per_query.get(r["query_id"], 0) + 1
    assert max(per_query.values()) == 1
    other, _ = run_mine(tmp_path / "r3", inputs, k=10, band=(0.5, 0.99), queries=25, pairs_per_query=1, seed=1)
    assert {r["query_id"] for r in other} != {r["query_id"] for r in rows}


@pytest.mark.parametrize("band", [(0.9, 0.8), (-2.0, 0.5), (0.5, 1.5)])
def test_bad_band_is_a_config_error(band):
    with pytest.raises(ValueError, match="a band is"):
        MineSettings(band=band)


def test_unknown_space_is_an_error(tmp_path):
    inputs = make_inputs(tmp_path, {"s0": [("q", h(1), {"a": vec(1.0)})]})
    with pytest.raises(ValueError, match="were not embedded"):
        MineStage(MineSettings(spaces=["nope"]), inputs, tmp_path / "pairs").plan()
    with pytest.raises(ValueError, match="no embedded space named"):
        MineStage(MineSettings(bands={"typo": (0.1, 0.2)}), inputs, tmp_path / "pairs").plan()


@pytest.mark.parametrize("settings", [{}, {"index": "IVF2,Flat", "search_params": "nprobe=2"}], ids=["flat", "ivf"])
def test_an_empty_first_shard_of_any_width_changes_nothing(tmp_path, settings):
    """Space b has nothing in the first shard. Whether that shard's file is (0, 8) or (0, 0) (as embed once wrote
    it), and with no space.json to say the width, mine takes the width from the first non-empty shard."""
    shards = random_corpus()
    shards["s0"] = [(k, hx, {"a": v["a"]}) for k, hx, v in shards["s0"]]
    mined = []
    for legacy in (False, True):
        inputs = make_inputs(tmp_path / str(legacy), shards)
        assert embeddings.load(inputs["embeddings"], "b", "s0")[2].shape == (0, 8)
        if legacy:
            embeddings.save(inputs["embeddings"], "b", "s0", np.array([], dtype=str), np.zeros(0, np.uint64), np.zeros((0, 0)))
        assert embeddings.read_manifests(inputs["embeddings"]) == {}
        rows, _ = run_mine(tmp_path / str(legacy), inputs, **MINED, **settings)
        mined.append(rows)
    assert mined[0] == mined[1] and any(s["space"] == "b" for r in mined[0] for s in r["spaces"])
