"""Mine benchmarks: every kNN backend (queries/s, effective TFLOP/s, recall@k, peak memory), and the
mine stage's peak memory when the corpus grows 10x at the same shard size.

    python -m bench.mine --cpu                       # the CPU subset: about 2 minutes on 2 cores
    python -m bench.mine                             # on a GPU machine: torch-exact at scale, faiss-gpu if installed
    python -m bench.mine --run runs/demo --space caption   # real embeddings of a run folder

- Data: clustered unit vectors stored as float16, as embed writes them; queries are held out of
  the base. Recall@k is measured against exact search on the same data.
- Effective TFLOP/s is 2 x queries x base x d / seconds, the brute-force work whatever the backend
  did: hardware throughput for exact backends, a speed-up figure for approximate ones.
- Each backend runs in a child process whose peak RSS (VmHWM, reset once the data is loaded) is its
  own; on a GPU, torch.cuda.max_memory_allocated too. GPU timings synchronise the device.
- Memory scaling runs the mine stage itself (catalog + embeddings on disk, as a run has them) at N
  and 10N images, each in a fresh process, and reports the peak RSS ratio (target: within 20%).

Results: bench/results/mine-{device}.json (bench.common.write_result), one row per measurement:
kind "knn" (a backend: `backend` and `index` as mine.backend / mine.index say them, `name` the
bench's label), "stage-memory" (one mine stage run) and "stage-memory-10x" (the ratio per backend).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import median_seconds, write_result

# d=768, 26M x 26M: the exact kNN of one MegaPairs-scale space (DESIGN.md §3).
FULL_SCALE_FLOP = 2 * 26e6 * 26e6 * 768

# CPU: one thread, as one mine worker runs by default (mine.cpus: 1; Ray adds workers, not threads).
CPU_DEFAULTS = dict(n=100_000, nq=2_000, d=128, k=32, shard=10_000, clusters=400, spread=1.2, repeats=3, nlist=256, threads=1,
                    scaling_n=100_000, scaling_d=64, scaling_queries=1_000)  # fmt: skip
GPU_DEFAULTS = dict(n=4_194_304, nq=65_536, d=768, k=32, shard=100_000, clusters=16_384, spread=1.2, repeats=3, nlist=4096,
                    threads=os.cpu_count(), scaling_n=200_000, scaling_d=768, scaling_queries=20_000)  # fmt: skip


def main(argv: list[str] | None = None) -> Path:
    """Run the mine benchmarks and write bench/results/mine-{device}.json; returns its path."""
    args = parse(argv)
    with tempfile.TemporaryDirectory(prefix="bench-mine-") as tmp:
        data = Path(tmp) / "data"
        t0 = time.perf_counter()
        load_at_start = os.getloadavg()  # other work on the machine skews CPU numbers: recorded with them
        meta = load_run(args.run, args.space, args.nq, data) if args.run else make_data(data, args)
        print(f"data: {meta['n']} x {meta['d']} base, {meta['nq']} queries ({time.perf_counter() - t0:.1f} s)", flush=True)
        results = []
        specs, skipped = plan_backends(args, meta)
        for spec in specs:
            results += run_child(spec, data, args.timeout)
        if not args.no_scaling:
            results += memory_scaling(args, Path(tmp) / "scaling")
    params = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "child"}
    params.update(meta, skipped=skipped, load_average={"start": load_at_start, "end": os.getloadavg()})
    path = write_result("mine", results, params, args.out)
    print(f"wrote {path}")
    return path


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="megasynth bench mine", description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="CPU only, at CPU sizes")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    for name in ("n", "nq", "d", "k", "shard", "clusters", "repeats", "nlist", "scaling_n", "scaling_d", "scaling_queries"):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int, default=None)
    p.add_argument("--spread", type=float, default=None, help="cluster spread of the synthetic data (higher: harder)")
    p.add_argument("--backends", default=None, help="comma list of: faiss-flat, torch-exact, ivf-flat, ivf-pq, hnsw (default: all that fit the device)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for faiss and torch (default: 1 on CPU, all on a GPU machine)")
    p.add_argument("--run", type=Path, default=None, help="use a run folder's embeddings instead of synthetic data")
    p.add_argument("--space", default=None, help="with --run: the space (default: the first)")
    p.add_argument("--no-scaling", action="store_true", help="skip the mine stage's memory-scaling run")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per child process")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: bench/results)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.cpu:
        args.device = "cpu"
    elif args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    for k, v in (GPU_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


# --- data ------------------------------------------------------------------------------------------


def make_data(folder: Path, args) -> dict:
    """Clustered unit vectors, float16: base.npy [n, d] and queries.npy [nq, d], drawn the same way (held out)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((args.clusters, args.d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    for name, rows in (("base", args.n), ("queries", args.nq)):
        out = np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=np.float16, shape=(rows, args.d))
        for s in range(0, rows, 65536):  # chunks keep generation memory small at any n
            out[s : s + 65536] = clustered_chunk(rng, centres, min(65536, rows - s), args.spread)
        out.flush()
        del out
    return {"n": args.n, "nq": args.nq, "d": args.d, "data": "synthetic", "queries_in_base": False}


def clustered_chunk(rng: np.random.Generator, centres: np.ndarray, n: int, spread: float) -> np.ndarray:
    x = centres[rng.integers(len(centres), size=n)] + spread / np.sqrt(centres.shape[1]) * rng.standard_normal((n, centres.shape[1]), dtype=np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def load_run(run: Path, space: str | None, nq: int, folder: Path) -> dict:
    """A run's embeddings of one space as the base; queries are a seeded sample of it (so they are in the base)."""
    from stages import embeddings

    emb = run / "embeddings"
    space = space or embeddings.spaces(emb)[0]
    base = np.concatenate([embeddings.load(emb, space, s, ("vectors",))[0] for s in embeddings.shards(emb, space)])
    picked = np.sort(np.random.default_rng(0).choice(len(base), size=min(nq, len(base)), replace=False))
    folder.mkdir(parents=True)
    np.save(folder / "base.npy", base)
    np.save(folder / "queries.npy", base[picked])
    return {"n": len(base), "nq": len(picked), "d": base.shape[1], "data": f"{run}:{space}", "queries_in_base": True}


# --- which backends, each in a child ------------------------------------------------------------------


def plan_backends(args, meta: dict) -> tuple[list[dict], list[str]]:
    """Child specs, the exact reference first (it writes the labels every other child scores recall against),
    and what was left out on this machine, and why."""
    cuda = args.device == "cuda"
    common = dict(k=args.k, shard=args.shard, repeats=args.repeats, threads=args.threads, device=args.device)
    n, d = meta["n"], meta["d"]
    nlist = max(1, min(args.nlist, n // 39))  # faiss wants >= 39 training points per list
    pq_m = next(m for m in (d // 4, d // 8, d // 2, d) if m and d % m == 0 and m <= 96)
    wanted = set(args.backends.split(",")) if args.backends else None
    gpu_faiss = cuda and _faiss_gpus() > 0
    specs = [
        # the reference: exact float32 (faiss on CPU; torch float32 on a GPU, where CPU faiss would take hours)
        dict(name="torch-exact" if cuda else "faiss-flat", backend="torch-exact" if cuda else "faiss-flat", dtype="float32", truth=True),
    ]
    if cuda:
        specs += [
            dict(name="torch-exact", backend="torch-exact", dtype="float16"),
            dict(name="torch-exact", backend="torch-exact", dtype="float16", resident=True),
            dict(name="torch-exact", backend="torch-exact", dtype="bfloat16"),
        ]
        if gpu_faiss:
            specs.append(dict(name="faiss-flat", backend="faiss-flat"))
    else:
        specs.append(dict(name="torch-exact", backend="torch-exact", dtype="float32"))
    if not cuda or gpu_faiss:  # faiss indexes on the GPU need faiss-gpu
        specs += [
            dict(name="ivf-flat", backend="faiss-index", index=f"IVF{nlist},Flat", params=[f"nprobe={p}" for p in (8, 16, 32, 64) if p <= nlist]),
            dict(name="ivf-pq", backend="faiss-index", index=f"IVF{nlist},PQ{pq_m}np", params=[f"nprobe={p}" for p in (16, 64) if p <= nlist], rerank=args.k),
        ]
    if not cuda:  # faiss has no GPU HNSW, and building one over millions of rows on one thread takes hours
        specs.append(dict(name="hnsw", backend="faiss-index", index="HNSW32", params=["efSearch=32", "efSearch=64", "efSearch=128"]))
    skipped = []
    if cuda and not gpu_faiss:
        skipped.append("faiss-flat, ivf-flat, ivf-pq on the GPU: faiss here has no GPU support (pip install 'megasynth[gpu]')")
    if cuda:
        skipped.append("hnsw: faiss has no GPU HNSW, and a one-thread build over millions of rows takes hours (run --cpu)")
    specs = [{**common, **s} for s in specs if s.get("truth") or wanted is None or s["name"] in wanted]
    return specs, skipped


def _faiss_gpus() -> int:
    from stages.knn.device import faiss_gpus

    return faiss_gpus()


def run_child(spec: dict, data: Path, timeout: int) -> list[dict]:
    """One backend in a fresh `python -m bench.mine --child` process; its JSON lines are its results."""
    label = f"{spec['name']} {spec.get('index', '')} {spec.get('dtype', '')}{' resident' if spec.get('resident') else ''}".strip()
    print(f"  {label} ...", flush=True)
    cmd = [sys.executable, "-m", "bench.mine", "--child", json.dumps({**spec, "data": str(data)})]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).resolve().parent.parent)
    print(f"    ({time.perf_counter() - t0:.1f} s)", flush=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        error = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
        return [{"kind": "knn", "name": spec["name"], "index": spec.get("index", "Flat"), "dtype": spec.get("dtype"), "error": error}]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    for r in rows:
        print("    " + ", ".join(f"{k}={r[k]}" for k in ("search_params", "queries_per_s", "tflops_effective", "recall_at_k", "recall_at_k_rescored", "build_s", "peak_delta_mb") if r.get(k) is not None), flush=True)
    return rows


# --- in the child -----------------------------------------------------------------------------------------


def child(spec: dict) -> None:
    import faiss
    import torch

    faiss.omp_set_num_threads(spec["threads"])
    torch.set_num_threads(spec["threads"])
    data = Path(spec["data"])
    base = np.load(data / "base.npy", mmap_mode="r")
    queries = np.load(data / "queries.npy")
    base = np.ascontiguousarray(base)  # in memory, as a worker holds shards it read; counted before the reset
    truth = np.load(data / "truth.npy") if (data / "truth.npy").exists() else None
    baseline = reset_peak_rss()
    for row in measure(spec, base, queries, truth, data):
        row.update(rss_base_mb=baseline, **peak_memory(baseline, spec["device"]))
        print(json.dumps(row), flush=True)


def measure(spec: dict, base: np.ndarray, queries: np.ndarray, truth: np.ndarray | None, data: Path):
    """Yields one result per searched configuration (one per search_params for an index)."""
    k, n, nq, d = spec["k"], len(base), len(queries), base.shape[1]
    sizes = [min(spec["shard"], n - s) for s in range(0, n, spec["shard"])]
    sync = _sync(spec["device"])
    # `backend` and `index` in mine's own vocabulary (mine.backend, mine.index); `name` is the bench's label
    config = "torch-exact" if spec["backend"] == "torch-exact" else "faiss"
    common = dict(kind="knn", name=spec["name"], backend=config, device=spec["device"], n=n, nq=nq, d=d, k=k, threads=spec["threads"])
    if spec["backend"] == "faiss-index":
        yield from measure_index(spec, base, queries, truth, sizes, common, data)
        return
    search, extra = exact_searcher(spec, base, sizes)
    result = {}
    timing = median_seconds(lambda: result.update(labels=search(queries, k)[1]), spec["repeats"], warmup=1, sync=sync)
    labels = to_global(result["labels"], sizes)
    if spec.get("truth"):
        np.save(data / "truth.npy", labels)
        truth = labels
    row = {**common, **extra, **rates(timing, nq, n, d), "recall_at_k": recall(labels, truth), "reference": bool(spec.get("truth"))}
    row["minutes_26m_x_26m_d768"] = round(FULL_SCALE_FLOP / (row["tflops_effective"] * 1e12) / 60, 1)  # exact search scales linearly
    yield row


def exact_searcher(spec: dict, base: np.ndarray, sizes: list[int]):
    """A search(queries, k) function over the sharded base, and what describes it."""
    from stages.knn.exact import exact_search

    shards = split(base, sizes)
    if spec["backend"] == "faiss-flat":
        gpu = None
        if spec["device"] == "cuda":
            from stages.knn.device import faiss_gpu_resources

            gpu = faiss_gpu_resources()
        return (lambda q, k: exact_search(q, iter(shards), k, gpu=gpu)), {"index": "Flat", "dtype": "float32"}
    import torch

    from stages.knn.torch_exact import DTYPES, TorchExact

    searcher = TorchExact(spec["device"], DTYPES[spec["dtype"]])
    if spec.get("resident"):  # the kernel's own throughput: base already on the device, no host transfer
        shards = [(i, torch.from_numpy(v).to(spec["device"])) for i, v in shards]
    desc = {"index": "Flat", "dtype": spec["dtype"], "base": "device-resident" if spec.get("resident") else "streamed from host"}
    return (lambda q, k: searcher.search(q, iter(shards), k)), desc


def measure_index(spec: dict, base, queries, truth, sizes, common, data: Path):
    import faiss

    from stages.knn import faiss_index
    from stages.knn.device import faiss_gpu_resources
    from stages.knn.rescore import Rescorer

    gpu = faiss_gpu_resources() if spec["device"] == "cuda" else None
    shards = split(base, sizes)
    t0 = time.perf_counter()
    if not faiss_index.builds_in_parallel_deterministically(spec["index"]):
        faiss.omp_set_num_threads(1)  # as the mine stage builds graph indexes
    index = faiss_index.build(spec["index"], base.shape[1], lambda: iter(shards), sizes, 200_000, seed=0, gpu=gpu)
    faiss.omp_set_num_threads(spec["threads"])
    build_s = time.perf_counter() - t0
    path = data / f"{spec['name']}.faiss"
    faiss_index.save(index, path, [str(i) for i in range(len(sizes))], sizes, spec["index"])
    del index
    k = spec["k"]
    loaded = faiss_index.LoadedIndex(path, [str(i) for i in range(len(sizes))], "", gpu)  # as a mine worker loads it
    for params in spec["params"]:
        loaded.set_search_params(params)
        result = {}
        timing = median_seconds(lambda: result.update(labels=loaded.search(queries, k)[1]), spec["repeats"], warmup=1, sync=_sync(spec["device"]))
        row = {**common, "index": spec["index"], "search_params": params, "dtype": "float32", "build_s": round(build_s, 2),
               "index_mb": round(path.stat().st_size / 2**20, 1), **rates(timing, len(queries), len(base), base.shape[1]),
               "recall_at_k": recall(to_global(result["labels"], sizes), truth)}  # fmt: skip
        if spec.get("rerank"):  # what the mine stage does: k + rerank candidates, re-scored exactly
            candidates = loaded.search(queries, k + spec["rerank"])[1]
            rescorer = Rescorer(queries, spec["device"])
            row["recall_at_k_rescored"] = recall(to_global(rescored(queries, shards, candidates, k, rescorer), sizes), truth)
            row["rerank"] = spec["rerank"]
        yield row


def rescored(queries, shards, labels, k, rescorer) -> np.ndarray:
    from stages.knn.exact import unpack

    scores = np.full(labels.shape, -np.inf, np.float32)
    shard, rows = unpack(labels)
    for i, vectors in shards:
        qi, ci = np.nonzero((labels >= 0) & (shard == i))
        scores[qi, ci] = rescorer.scores(vectors, qi, rows[qi, ci])
    order = np.lexsort((labels, -scores), axis=1)[:, :k]
    return np.take_along_axis(labels, order, 1)


def split(base: np.ndarray, sizes: list[int]) -> list[tuple[int, np.ndarray]]:
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    return [(i, base[offsets[i] : offsets[i + 1]]) for i in range(len(sizes))]


def to_global(labels: np.ndarray, sizes: list[int]) -> np.ndarray:
    from stages.knn.exact import unpack

    offsets = np.concatenate([[0], np.cumsum(sizes)])
    shard, row = unpack(labels)
    return np.where(labels >= 0, offsets[np.clip(shard, 0, len(sizes) - 1)] + row, -1)


def recall(found: np.ndarray, truth: np.ndarray | None) -> float | None:
    if truth is None:
        return None
    hits = sum(len(np.intersect1d(f[f >= 0], t)) for f, t in zip(found, truth))
    return round(hits / truth.size, 4)


def rates(timing: dict, nq: int, n: int, d: int) -> dict:
    s = timing["median_s"]
    tflops = 2 * nq * n * d / s / 1e12
    return {
        "median_s": round(s, 4), "min_s": round(timing["min_s"], 4), "max_s": round(timing["max_s"], 4), "repeats": timing["repeats"],
        "queries_per_s": round(nq / s, 1), "tflops_effective": round(tflops, 3),
    }  # fmt: skip


def _sync(device: str):
    if device != "cuda":
        return None
    import torch

    return torch.cuda.synchronize


# --- memory ------------------------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> float:
    """Reset VmHWM to the current RSS (Linux clear_refs 5) and return the current RSS in MB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # then the peak includes setup; the baseline still tells them apart
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
    except ImportError:
        pass
    return round(_status_kb("VmRSS") / 1024, 1)


def peak_memory(baseline_mb: float, device: str) -> dict:
    peak = round(_status_kb("VmHWM") / 1024, 1)
    out = {"peak_rss_mb": peak, "peak_delta_mb": round(peak - baseline_mb, 1)}
    if device == "cuda":
        import torch

        out["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)  # torch allocations only (not faiss-gpu's)
    return out


# --- the mine stage at N and 10N ------------------------------------------------------------------------------


def memory_scaling(args, folder: Path) -> list[dict]:
    """The mine stage over N and 10N images -- same shard size, same queries, same queries per unit --
    each in a fresh process. A worker's memory must not follow the corpus: at 10N the base alone is
    10N x d x 2 bytes, so anything held per base row would show. Rows: one per run ("stage-memory")
    and one ratio per backend ("stage-memory-10x")."""
    n1, shard = args.scaling_n, args.shard
    settings = dict(k=args.k, band=[0.5, 0.99], queries=args.scaling_queries, queries_per_unit=max(1, args.scaling_queries // 2), seed=0, cpus=args.threads)
    devices = {"faiss": "cuda" if args.device == "cuda" and _faiss_gpus() else "cpu", "torch-exact": args.device}
    rows = []
    for backend, device in devices.items():
        runs = [stage_run(folder, n, shard, args, {**settings, "backend": backend, "device": device}) for n in (n1, 10 * n1)]
        common = dict(backend=backend, index="Flat", device=device, shard_rows=shard, d=args.scaling_d, settings=settings)
        rows += [{"kind": "stage-memory", **common, **r} for r in runs]
        if not any("error" in r for r in runs):
            small, large = runs
            rows.append({"kind": "stage-memory-10x", **common, "images": [n1, 10 * n1],
                         "peak_rss_ratio_10x": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
                         "working_set_ratio_10x": round(large["peak_delta_mb"] / max(small["peak_delta_mb"], 1e-9), 3),  # above the import baseline
                         "within_20_percent": large["peak_rss_mb"] <= 1.2 * small["peak_rss_mb"]})  # fmt: skip
    return rows


def stage_run(folder: Path, n: int, shard: int, args, settings: dict) -> dict:
    inputs = folder / f"n{n}"
    if not inputs.exists():
        t0 = time.perf_counter()
        write_stage_inputs(inputs, n, shard, args.scaling_d)
        print(f"  wrote {n} images of stage inputs ({time.perf_counter() - t0:.1f} s)", flush=True)
    spec = {"stage_inputs": str(inputs), "images": n, "settings": settings, "threads": args.threads}
    print(f"  mine stage, {settings['backend']} on {settings['device']}, {n} images ...", flush=True)
    proc = subprocess.run([sys.executable, "-m", "bench.mine", "--child", json.dumps(spec)], capture_output=True, text=True,
                          timeout=args.timeout, cwd=Path(__file__).resolve().parent.parent)  # fmt: skip
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return {"images": n, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"    peak {row['peak_rss_mb']} MB (baseline {row['rss_base_mb']} MB), {row['seconds']} s", flush=True)
    return row


def write_stage_inputs(folder: Path, n: int, shard: int, d: int) -> None:
    """A catalog and one embedding space of n clustered images, in shards of `shard` rows, as ingest and embed write them."""
    from stages import catalog, embeddings

    (folder / "catalog").mkdir(parents=True)
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((max(8, n // 200), d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    for s, start in enumerate(range(0, n, shard)):
        name, rows = f"{s:05d}", min(shard, n - start)
        ids = [f"{name}/{i:07d}" for i in range(rows)]
        sha = [f"{start + i:016x}" + "0" * 48 for i in range(rows)]  # embeddings keep the first 64 bits: make them unique
        catalog.write(folder / "catalog" / f"{name}.parquet", [{"id": i, "shard": name, "key": i.split("/")[1], "sha256": h, "status": "ok"} for i, h in zip(ids, sha)])
        vectors = clustered_chunk(rng, centres, rows, 0.8)
        embeddings.save(folder / "embeddings", "a", name, np.array(ids), np.array([embeddings.hash64(h) for h in sha], np.uint64), vectors)


def stage_child(spec: dict) -> None:
    import faiss
    import torch

    from stages.mine import MineSettings, MineStage

    faiss.omp_set_num_threads(spec["threads"])
    torch.set_num_threads(spec["threads"])
    folder = Path(spec["stage_inputs"])
    with tempfile.TemporaryDirectory(prefix="bench-mine-pairs-") as out:
        stage = MineStage(MineSettings(**spec["settings"]), {"catalog": folder / "catalog", "embeddings": folder / "embeddings"}, Path(out))
        baseline = reset_peak_rss()
        t0 = time.perf_counter()
        stage.setup()
        units = queries = pairs = 0
        for wave in stage.plan():
            for unit in wave:
                stats = stage.process(unit)
                units, queries, pairs = units + 1, queries + stats.input, pairs + stats.output
        seconds = round(time.perf_counter() - t0, 2)
    print(json.dumps({"images": spec["images"], "units": units, "queries": queries, "pairs": pairs, "seconds": seconds, "rss_base_mb": baseline,
                      **peak_memory(baseline, spec["settings"]["device"])}))  # fmt: skip


if __name__ == "__main__":
    if "--child" in sys.argv:
        spec = json.loads(sys.argv[sys.argv.index("--child") + 1])
        stage_child(spec) if "stage_inputs" in spec else child(spec)
    else:
        main(sys.argv[1:])
