"""search and mine: every backend, the similarity band at its edges, the union over spaces, duplicates, hard negatives."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.config import MineOptions
from stages import catalog, embeddings, neighbours, pairs
from stages.base import Stats
from stages.knn.exact import exact_search, unpack
from stages.mine import MineSettings, MineStage
from stages.search import SearchSettings, SearchStage


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


def split(**settings) -> tuple[SearchSettings, MineSettings]:
    """`mine:` as written in a config, as the two stages behind it take it."""
    settings.setdefault("seed", 0)
    opts = MineOptions(**settings)
    return tuple(cls.model_validate(opts.model_dump(include=set(cls.model_fields))) for cls in (SearchSettings, MineSettings))


def search_stage(tmp_path, inputs, **settings) -> SearchStage:
    return SearchStage(split(**settings)[0], inputs, tmp_path / "neighbours")


def run_search(tmp_path, inputs, **settings) -> SearchStage:
    stage = search_stage(tmp_path, inputs, **settings)
    for wave in stage.plan():
        for unit in wave:
            stage.process(unit)
    return stage


def run_mine(tmp_path, inputs, search: bool = True, **settings) -> tuple[list[dict], Stats]:
    """Every wave of search (unless it has run), then mine, as an executor runs them; returns the pairs and mine's stats."""
    if search:
        run_search(tmp_path, inputs, **settings)
    stage = MineStage(split(**settings)[1], {"catalog": inputs["catalog"], "neighbours": tmp_path / "neighbours"}, tmp_path / "pairs")
    total = Stats()
    for unit in stage.plan()[0]:
        total += stage.process(unit)
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
    stage = search_stage(tmp_path, corpus_inputs, index="IVF4,Flat", search_params="nprobe=4", **MINED)
    index_wave, query_wave = stage.plan()
    assert [u.id for u in index_wave] == ["index-a", "index-b"]
    assert all(u.id.startswith("queries-") for u in query_wave)
    with pytest.raises(FileNotFoundError, match="index unit has not run"):
        stage.process(query_wave[0])
    stats = stage.process(index_wave[0])
    assert stats.counters["indexed.a"] == 160 and stats.input == stats.output == 0
    assert sorted(p.name for p in (tmp_path / "neighbours" / "index").iterdir()) == ["a.faiss", "a.faiss.json"]


@pytest.mark.parametrize("index", ["IVF4,PQ4x4np", "HNSW8"])
def test_index_build_gives_the_same_bytes(tmp_path, corpus_inputs, index):
    """HNSW is built on one thread whatever mine.cpus says: a parallel build's graph depends on timing."""
    built = []
    for run in ("one", "two"):
        stage = search_stage(tmp_path / run, corpus_inputs, index=index, cpus=2, **MINED)
        stage.process(stage.plan()[0][0])
        built.append((tmp_path / run / "neighbours" / "index" / "a.faiss").read_bytes())
    assert built[0] == built[1]


def test_plan_checks_the_index_at_the_spaces_dimension(tmp_path):
    inputs = make_inputs(tmp_path, {"s0": [("q", h(1), {"a": vec(1.0)})]})  # d = 8
    with pytest.raises(ValueError, match=r"mine.index: faiss cannot build 'IVF2,PQ3' at d=8: .*multiple.* \(space a\)"):
        search_stage(tmp_path, inputs, index="IVF2,PQ3").plan()


def test_resources_ask_for_a_gpu_only_when_mining_on_one(tmp_path):
    def gpus(**kw):
        return search_stage(tmp_path, {}, **kw).resources().gpus

    assert gpus(device="cuda") == 1.0 and gpus(device="cuda", backend="torch-exact") == 1.0
    assert gpus(device="cpu") == 0.0 and gpus(device="cuda", gpus=0.5) == 0.5
    assert SearchStage.loads_model  # one worker per GPU keeps its device and loaded index across units
    assert not MineStage.loads_model and MineStage(split()[1], {}, tmp_path).resources().gpus == 0  # choosing pairs is CPU work


def test_query_sample_and_pairs_per_query_are_seeded(tmp_path):
    shards = random_corpus()
    inputs = make_inputs(tmp_path, shards)
    rows, stats = run_mine(tmp_path / "r1", inputs, k=10, band=(0.5, 0.99), queries=45, pairs_per_query=1)
    again, _ = run_mine(tmp_path / "r2", inputs, k=10, band=(0.5, 0.99), queries=45, pairs_per_query=1)
    assert rows == again
    assert 30 <= stats.input <= 60  # about 45 of the 90 images: a count is the share it is of the corpus
    per_query = {}
    for r in rows:
        per_query[r["query_id"]] = per_query.get(r["query_id"], 0) + 1
    assert max(per_query.values()) == 1
    other, _ = run_mine(tmp_path / "r3", inputs, k=10, band=(0.5, 0.99), queries=45, pairs_per_query=1, seed=1)
    assert {r["query_id"] for r in other} != {r["query_id"] for r in rows}


def searched_queries(folder) -> set[str]:
    return {i for u in neighbours.units(folder) for i in neighbours.read(folder / f"{u}.parquet", [], 1)[0]["query_id"].to_pylist()}


def test_query_samples_nest(tmp_path):
    """The 25% sample is inside the 50% one, inside all: on ids, whatever the unit size."""
    inputs = make_inputs(tmp_path, random_corpus(n_shards=4, per=50))
    found = {}
    for q, per_unit in ((0.25, 7), (0.5, 1000), (None, 13)):
        run_search(tmp_path / str(q), inputs, k=4, queries=q, queries_per_unit=per_unit)
        found[q] = searched_queries(tmp_path / str(q) / "neighbours")
    assert found[0.25] < found[0.5] < found[None] and len(found[None]) == 200
    assert 25 <= len(found[0.25]) <= 75 and 70 <= len(found[0.5]) <= 130


def test_corpus_scale_nests_and_mines_within_the_fraction(tmp_path):
    """A corpus-scale variant keeps the images below a stable hash threshold: queries and neighbours both."""
    inputs = make_inputs(tmp_path, random_corpus(n_shards=4, per=50))
    kept = {}
    for fraction in (0.3, 0.6, 1.0):
        run_search(tmp_path / str(fraction), inputs, k=6, corpus_fraction=fraction, seed=fraction == 0.6 and 7 or 0)
        folder = tmp_path / str(fraction) / "neighbours"
        kept[fraction] = searched_queries(folder)
        ids = {i for u in neighbours.units(folder) for i in catalog_ids(inputs, neighbours.read(folder / f"{u}.parquet", ["a"], 7)[1]["a"][0])}
        assert ids <= kept[fraction]  # every neighbour found lies inside the mined corpus
    assert kept[0.3] < kept[0.6] < kept[1.0]  # nested, and the same for any seed
    assert 30 <= len(kept[0.3]) <= 90


def catalog_ids(inputs, ordinals: np.ndarray) -> set[str]:
    shard, rows = unpack(ordinals[ordinals >= 0])
    names = catalog.shards(inputs["catalog"])
    return {catalog.read(inputs["catalog"], names[s], ok_only=False, columns=["id"])["id"][int(r)].as_py() for s, r in zip(shard, rows)}


@pytest.mark.parametrize("band", [(0.9, 0.8), (-2.0, 0.5), (0.5, 1.5)])
def test_bad_band_is_a_config_error(band):
    with pytest.raises(ValueError, match="a band is"):
        MineSettings(band=band)


def test_unknown_space_is_an_error(tmp_path):
    inputs = make_inputs(tmp_path, {"s0": [("q", h(1), {"a": vec(1.0)})]})
    with pytest.raises(ValueError, match="were not embedded"):
        search_stage(tmp_path, inputs, spaces=["nope"]).plan()
    with pytest.raises(ValueError, match="no embedded space named"):
        run_mine(tmp_path, inputs, bands={"typo": (0.1, 0.2)})


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


def test_pairs_from_a_deeper_search_are_the_pairs_of_a_search_at_that_depth(tmp_path, corpus_inputs):
    """A search to k=10 over three spaces' worth of lists stands in for one to k=4 over one space."""
    run_search(tmp_path / "deep", corpus_inputs, k=10)
    reused, _ = run_mine(tmp_path / "deep", corpus_inputs, search=False, k=4, spaces=["a"], band=(0.6, 0.98))
    fresh, _ = run_mine(tmp_path / "fresh", corpus_inputs, k=4, spaces=["a"], band=(0.6, 0.98))
    assert reused == fresh and len(fresh) > 50
    stage = search_stage(tmp_path / "x", corpus_inputs, k=10)
    deep, shallow = stage.scope(), search_stage(tmp_path / "x", corpus_inputs, k=4, spaces=["a"], queries=0.5).scope()
    assert stage.covers(deep, shallow) and not stage.covers(shallow, deep)


def test_the_pair_policy_is_a_function_of_the_neighbour_lists():
    """No search, no files: a few literal neighbours and the settings decide the pairs."""
    from stages.mine import choose_pairs, union_neighbours

    # query ordinal 0 with hash 10; neighbours 1..5 in spaces a and b (ordinals, hashes, scores per query row)
    rows = {
        "a": ([[0, 1, 2, 3, 4]], [[10, 11, 12, 10, 14]], [[1.0, 0.97, 0.85, 0.9, 0.5]]),
        "b": ([[0, 2, 5, -1, -1]], [[10, 12, 15, 0, 0]], [[1.0, 0.82, 0.88, -np.inf, -np.inf]]),
    }
    found = union_neighbours(0, rows, 0)
    assert sorted(found) == [1, 2, 3, 4, 5] and found[2].scores == {"a": 0.85, "b": 0.82}
    settings, stats = split(band=(0.8, 0.96), pairs_per_query=5, hard_negatives=2)[1], Stats()
    made = choose_pairs("s/q", 10, found, settings, stats)
    # 1 is a near-duplicate (0.97 >= 0.96), 3 the query's exact duplicate (same hash), 4 below the band
    assert [(t.ordinal, band) for t, band, _ in made] == [(2, {"a": 0.85, "b": 0.82}), (5, {"b": 0.88})]
    assert [[n.ordinal for n in negs] for _, _, negs in made] == [[5, 4], [2, 4]]  # hardest first, never the target
    assert stats.counters["near_duplicates"] == 1 and stats.counters["exact_duplicates"] == 1 and stats.counters["below_band"] == 1
    assert choose_pairs("s/q", 10, found, split(band=(0.9, 0.96))[1], Stats()) == []  # nothing strictly inside (0.9, 0.96)
