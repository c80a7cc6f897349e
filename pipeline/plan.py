"""`megasynth plan`: GPU-hours, memory and storage per stage for a corpus of a given size.

Every estimate is an extrapolation from one measured figure, and says which: a field of a
benchmark result under bench/results/ (`{bench}-{device}.json`, written by `python -m bench.embed`,
`bench.mine`, `bench.annotate`) when one was measured for the config's model on that device,
else the H200 figures of DESIGN.md §3, copied below. What neither covers is reported as not
estimated, with the benchmark that would measure it.
"""

from __future__ import annotations

import json
import re
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from pipeline.config import RunConfig, load_config

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"
DEMO_TRIPLETS = RESULTS.parent.parent / "runs" / "demo" / "triplets"  # where `make demo` writes, from the checkout
DESIGN = "DESIGN.md §3, H200, random weights"
REFERENCE_DEVICE = "h200"  # the device of the DESIGN table, and the default for configs that run on a GPU


@dataclass(frozen=True)
class Figure:
    """One measured number and where it comes from."""

    value: float
    source: str


# DESIGN.md §3, measured on one H200 (random weights, real shapes, bf16).
DESIGN_H200 = {
    "clip-vit-l14-vision": Figure(2430, f"{DESIGN}: CLIP ViT-L/14 vision tower at 224 px, 2,430 images/s (raw forward)"),
    "dinov2-b14": Figure(7440, f"{DESIGN}: DINOv2-B/14, 7,440 images/s (raw forward)"),
    "pil-decode-per-core": Figure(142, f"{DESIGN}: PIL decode+resize of 512px JPEGs, 142 images/s per CPU core"),
    "nvjpeg": Figure(24500, f"{DESIGN}: nvJPEG on the GPU, 24,500 images/s"),
    # 4M base x 32k queries (read as 32,768), d=768, k=64 in 1.35 s -> 2 x 4e6 x 32768 x 768 / 1.35 FLOP/s
    "knn-torch-tflops": Figure(2 * 4e6 * 32768 * 768 / 1.35 / 1e12, f"{DESIGN}: exact tiled kNN in torch, 4M x 32k queries, d=768, k=64 in 1.35 s"),
    "describe-b64": Figure(18.4, f"{DESIGN}: Qwen2-VL-2B-shaped VLM, plain generate, two 448px images, 612 prompt + 128 new tokens, batch 64: 18.4 pairs/s"),
    "describe-b256": Figure(36.5, f"{DESIGN}: Qwen2-VL-2B-shaped VLM, plain generate, batch 256: 36.5 pairs/s"),
    "instruct-b128": Figure(28, f"{DESIGN}: Llama-3-8B-shaped LLM, plain generate, 512 prompt + 96 new tokens, batch 128: 28 requests/s"),
    "embedding-dim": Figure(768, f"{DESIGN}: 20M x 768 x fp16 per space"),
}
# Which DESIGN figure measured which hub model (image towers only: the table has no text tower).
DESIGN_MODELS = {"openai/clip-vit-large-patch14": "clip-vit-l14-vision", "facebook/dinov2-base": "dinov2-b14"}
# bench/annotate.py labels its rows with this when it runs random weights in the describer shape DESIGN measured.
QWEN2_VL_2B_SHAPE = "Qwen2-VL-2B shape"
SHARD_ROWS = 10_000  # img2dataset's default samples per shard: the mine memory formulas need a shard size
ID_BYTES = 4 * 15  # ids "{5-digit shard}/{9-digit key}" stored as numpy U15 (stages.embeddings)
HASH_BYTES = 8


@dataclass
class Estimate:
    stage: str
    what: str
    value: float | None  # None: not estimated, `source` says why
    unit: str
    source: str
    basis: str = ""
    caveat: str = ""


# --- sizes ----------------------------------------------------------------------------------

_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}


def parse_count(text: str) -> int:
    """'20M', '500k', '2000000', '1.5M', '2_000_000' -> an image count."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmbg]?)", str(text).strip().lower().replace("_", "").replace(",", ""))
    if not m:
        raise ValueError(f"--images {text!r}: expected a count such as 20M, 500k or 2000000")
    value = float(m.group(1)) * _SUFFIX[m.group(2)]
    if value < 1 or value != int(value):
        raise ValueError(f"--images {text!r}: not a whole, positive number of images")
    return int(value)


# --- reading benchmark results --------------------------------------------------------------


def load_result(results_dir: Path, bench: str, device: str) -> tuple[str, dict] | None:
    """(file name, payload) of `{bench}-{device}.json`, or None."""
    path = Path(results_dir) / f"{bench}-{device}.json"
    if not path.is_file():
        return None
    return path.name, json.loads(path.read_text())


def _same_model(measured: str | None, configured: str) -> bool:
    """A result's model is the config's: the same hub id, or the same model folder name (demo models)."""
    if not measured:
        return False
    return measured == configured or measured.split(" ")[0] == Path(configured).name


def embed_entry(result: tuple[str, dict] | None, space: str, model: str) -> tuple[str, dict] | None:
    if result is None:
        return None
    name, payload = result
    for r in payload.get("results", []):
        if r.get("space") == space and _same_model(r.get("model"), model) and "stage_images_per_s" in r:
            return name, r
    return None


def _params(result: tuple[str, dict]) -> dict:
    return result[1].get("params", {})


# --- per stage -------------------------------------------------------------------------------


def estimate(config: RunConfig, images: int, results_dir: Path = RESULTS, device: str | None = None, demo_triplets: Path = DEMO_TRIPLETS) -> dict:
    """Every stage's estimates for a corpus of `images` images, each naming the figure it extrapolates from."""
    device = device or default_device(config)
    found = {b: load_result(results_dir, b, device) for b in ("embed", "mine", "annotate")}
    queries = query_count(config, images)
    pairs = queries * config.mine.pairs_per_query
    dims = {name: space_dim(found["embed"], name, sp.model) for name, sp in config.embed.spaces.items()}
    estimates = [
        *ingest_estimates(found["embed"], images, device),
        *embed_estimates(config, found["embed"], images, dims, device),
        *mine_estimates(config, found["mine"], images, queries, dims, device),
        *annotate_estimates(config, found["annotate"], pairs, device),
        *write_estimates(config, images, queries, pairs, demo_triplets),
    ]
    for e in estimates:  # estimates are written in GPU-hours; on the CPU the same figures are worker-hours
        e.unit = hours_unit(device) if e.unit == "GPU-hours" else e.unit
    return {
        "images": images,
        "queries": queries,
        "pairs": pairs,
        "device": device,
        "results": {b: (r[0] if r else None) for b, r in found.items()},
        "estimates": [asdict(e) for e in estimates],
        "totals": totals(estimates, hours_unit(device)),
    }


def hours_unit(device: str) -> str:
    """Model stages' time: GPU-hours on a GPU, worker-hours (a worker's CPUs busy) on the CPU."""
    return "worker-hours" if device == "cpu" else "GPU-hours"


def default_device(config: RunConfig) -> str:
    return "cpu" if config.embed.device == "cpu" else REFERENCE_DEVICE


def design(key: str, device: str) -> Figure | None:
    """A DESIGN §3 figure, only for the device it was measured on."""
    return DESIGN_H200.get(key) if device == REFERENCE_DEVICE else None


def query_count(config: RunConfig, images: int) -> int:
    q = config.mine.queries
    if q is None:
        return images
    if isinstance(q, float):
        return round(q * images)
    return min(q, images)


def space_dim(embed: tuple[str, dict] | None, space: str, model: str) -> Figure:
    """Output dimension of a space: measured by the embed benchmark, else the model folder's config, else DESIGN's 768."""
    entry = embed_entry(embed, space, model)
    if entry and entry[1].get("dim"):
        return Figure(entry[1]["dim"], f"{entry[0]}: results[space={space}].dim")
    cfg = Path(model).expanduser() / "config.json"
    if cfg.is_file():
        c = json.loads(cfg.read_text())
        dim = c.get("projection_dim") or c.get("hidden_size") or c.get("head_channels")  # head_channels: efficientnet_lite's pooled width
        if dim:
            return Figure(dim, f"{cfg}: projection_dim / hidden_size / head_channels")
    return DESIGN_H200["embedding-dim"]


def ingest_estimates(embed, images: int, device: str) -> list[Estimate]:
    rate = pil_rate(embed, device)
    if rate is None:
        return [Estimate("ingest", "decode every image (CPU)", None, "CPU-hours", f"no PIL decode figure for {device}: run python -m bench.embed there")]
    return [Estimate("ingest", "decode every image (CPU)", images / rate.value / 3600, "CPU-hours", rate.source, f"{images:,} images / {rate.value:,.0f} images/s per core")]


def pil_rate(embed, device: str) -> Figure | None:
    if embed:
        for r in embed[1].get("results", []):
            if r.get("decoder") == "pil" and r.get("threads") == 1:
                return Figure(r["images_per_s"], f"{embed[0]}: results[decoder=pil, threads=1].images_per_s (decode only, no resize)")
    return design("pil-decode-per-core", device)


def embed_estimates(config: RunConfig, embed, images: int, dims: dict[str, Figure], device: str) -> list[Estimate]:
    out = []
    for name, sp in config.embed.spaces.items():
        out.append(space_time(config, embed, name, sp, images, device))
        out.append(space_storage(name, images, dims[name]))
    out.append(whole_stage_time(config, embed, images, [e for e in out if e.unit == "GPU-hours"]))
    out.append(embed_memory(config, embed))
    return out


def space_time(config: RunConfig, embed, name: str, sp, images: int, device: str) -> Estimate:
    what = f"{name}: {sp.kind} tower ({sp.model})"
    entry = embed_entry(embed, name, sp.model)
    if entry:
        rate = entry[1]["stage_images_per_s"]
        p = _params(embed)
        caveat = _setting_caveat(p, config.embed.batch_size, config.embed.dtype)
        return Estimate("embed", what, images / rate / 3600, "GPU-hours", f"{entry[0]}: results[space={name}].stage_images_per_s = {rate:,.0f}",
                        f"{images:,} / {rate:,.0f} per s", caveat)
    key = DESIGN_MODELS.get(sp.model) if sp.kind == "image" else None
    fig = design(key, device) if key else None
    if fig:
        return Estimate("embed", what, images / fig.value / 3600, "GPU-hours", fig.source, f"{images:,} / {fig.value:,.0f} per s",
                        "a raw forward rate: the stage adds decode and preprocessing (target: >= 85% of it)")
    return Estimate("embed", what, None, "GPU-hours", f"no measured figure for this model on {device}: run python -m bench.embed there")


def _setting_caveat(params: dict, batch_size: int, dtype: str) -> str:
    diffs = [f"{k} {params.get(k)} (config: {v})" for k, v in (("batch_size", batch_size), ("dtype", dtype)) if params.get(k) not in (None, v)]
    if isinstance(params.get("model_input_side"), int):  # the CPU run shrinks the demo models' input
        diffs.append(f"model input {params['model_input_side']} px")
    return "measured at " + ", ".join(diffs) if diffs else ""


def space_storage(name: str, images: int, dim: Figure) -> Estimate:
    per_image = dim.value * 2 + HASH_BYTES + ID_BYTES
    return Estimate("embed", f"{name}: embeddings on disk", images * per_image, "bytes", dim.source,
                    f"{images:,} x ({dim.value:.0f} dims x 2 B fp16 + {HASH_BYTES} B hash + {ID_BYTES} B id)")


def whole_stage_time(config: RunConfig, embed, images: int, spaces: list[Estimate]) -> Estimate:
    """All spaces in one worker (each image decoded once): measured together if the benchmark ran them together."""
    if embed:
        for r in embed[1].get("results", []):
            if r.get("space") == "all spaces" and set(r.get("spaces", [])) == set(config.embed.spaces):
                if all(embed_entry(embed, s, config.embed.spaces[s].model) for s in r["spaces"]):
                    rate = r["stage_images_per_s"]
                    return Estimate("embed", "whole stage, all spaces in one worker", images / rate / 3600, "GPU-hours",
                                    f"{embed[0]}: results[space=all spaces].stage_images_per_s = {rate:,.0f}", f"{images:,} / {rate:,.0f} per s")
    known = [e for e in spaces if e.value is not None]
    missing = [e.what.split(":")[0] for e in spaces if e.value is None]
    if not known:
        return Estimate("embed", "whole stage, all spaces in one worker", None, "GPU-hours", "no space measured")
    return Estimate("embed", "whole stage, all spaces in one worker", sum(e.value for e in known), "GPU-hours",
                    "the sum of the spaces above (not measured together)", " + ".join(f"{e.value:.2f}" for e in known),
                    f"a lower bound: {', '.join(missing)} not measured" if missing else "")


def embed_memory(config: RunConfig, embed) -> Estimate:
    if embed:
        for r in embed[1].get("results", []):
            if r.get("space") == "all spaces" and r.get("stage_peak_gpu_memory_gb"):
                caveat = _setting_caveat(_params(embed), config.embed.batch_size, config.embed.dtype)
                return Estimate("embed", "GPU memory per worker", r["stage_peak_gpu_memory_gb"] * 2**30, "bytes",
                                f"{embed[0]}: results[space=all spaces].stage_peak_gpu_memory_gb", "peak allocated, all spaces' models + prefetched batches", caveat)
    return Estimate("embed", "GPU memory per worker", None, "bytes", "not measured: run python -m bench.embed on the GPU")


def mine_estimates(config: RunConfig, mine, images: int, queries: int, dims: dict[str, Figure], device: str) -> list[Estimate]:
    m = config.mine
    backend, index = getattr(m, "backend", "faiss"), getattr(m, "index", "Flat")
    spaces = m.spaces or list(config.embed.spaces)
    if backend == "faiss" and index != "Flat":
        return [Estimate("mine", f"search, {index}", None, "GPU-hours", "approximate index: its cost is not a FLOP count; measure it with bench/mine.py")]
    rate = knn_rate(mine, backend, device)
    out = []
    for name in spaces:
        d = dims[name].value if name in dims else DESIGN_H200["embedding-dim"].value
        flop = 2 * queries * images * d
        if rate is None:
            out.append(Estimate("mine", f"{name}: exact search", None, "GPU-hours", f"no kNN figure for backend {backend} on {device}: run bench/mine.py there"))
            continue
        caveat = rate[1]
        out.append(Estimate("mine", f"{name}: exact search ({backend})", flop / (rate[0].value * 1e12) / 3600, "GPU-hours", rate[0].source,
                            f"2 x {queries:,} queries x {images:,} base x {d:.0f} dims = {flop:.2e} FLOP at {rate[0].value:,.0f} TFLOP/s", caveat))
    out.extend(mine_memory(config, queries, max((dims[s].value for s in spaces if s in dims), default=768), len(spaces)))
    return out


def knn_rate(mine, backend: str, device: str) -> tuple[Figure, str] | None:
    """Effective TFLOP/s of exact search: the best measured for this backend, else DESIGN's torch figure."""
    if mine:
        best = None
        for i, r in enumerate(mine[1].get("results", [])):
            # exact search only (an IVF row's "effective" rate counts FLOPs it never did), and for
            # torch-exact the base streamed from the host, as the stage runs it
            if r.get("kind") != "knn" or r.get("index", "Flat") != "Flat" or (r.get("base") or "streamed from host") != "streamed from host":
                continue
            tflops = r.get("tflops_effective")  # bench/mine.py's field
            if isinstance(tflops, (int, float)) and r.get("backend") == backend and (best is None or tflops > best[0]):
                best = (tflops, f"{mine[0]}: results[{i}].tflops_effective (backend {backend})")
        if best:
            return Figure(*best), ""
    fig = design("knn-torch-tflops", device)
    if fig is None:
        return None
    caveat = "" if backend == "torch-exact" else f"measured for a torch tiled matmul; the config's backend is {backend}"
    return Figure(fig.value, f"{fig.source} = {fig.value:,.0f} TFLOP/s effective"), caveat


def mine_memory(config: RunConfig, queries: int, d: float, n_spaces: int) -> list[Estimate]:
    """Peak memory of one mine worker, by the formulas in stages/knn/__init__.py."""
    m = config.mine
    nq = min(m.queries_per_unit, queries)
    k, rerank, hn = m.k, m.rerank, m.hard_negatives
    K, R, P = k + 1 + rerank, SHARD_ROWS, nq * m.pairs_per_query
    qb, bb = m.query_block, m.base_block or 65536  # base_block None: the cuda default
    host = nq * d * 2 + nq * K * 28 + n_spaces * nq * (k + 1) * 20 + 3 * R * d * 2 + 16384 * d * 16 + P * (16 + 4 * n_spaces + 12 * hn) + P * (70 + 30 * hn)
    source = "stages/knn/__init__.py: peak memory formulas"
    basis = f"nq={nq:,} queries per unit, d={d:.0f}, K={K}, R={R:,} rows per base shard (img2dataset's default shard, assumed)"
    if m.backend == "torch-exact":
        b = 2  # float16 on cuda (torch-exact's auto dtype)
        device_bytes = nq * d * b + nq * K * 12 + bb * (d * b + 8) + qb * bb * b
        return [Estimate("mine", "host memory per worker", host + 4 * bb * d * 2, "bytes", source, basis),
                Estimate("mine", "GPU memory per worker", device_bytes, "bytes", source, basis + f", qb={qb}, bb={bb}, float16")]
    return [Estimate("mine", "host memory per worker (faiss Flat)", host + nq * K * 12 + (qb + R) * d * 4 + qb * K * 12, "bytes", source, basis)]


def annotate_estimates(config: RunConfig, annotate, pairs: int, device: str) -> list[Estimate]:
    a = config.annotate
    out = [Estimate("annotate", "pairs to annotate", pairs, "pairs", "the config: queries x mine.pairs_per_query",
                    "an upper bound: a query with fewer in-band neighbours yields fewer pairs")]
    for step, gen, key in (("describe", a.describer, "describe"), ("instruct", a.instructor, "instruct")):
        rate = annotate_rate(annotate, step, gen, device)
        if rate is None:
            out.append(Estimate("annotate", f"{step} ({gen.model})", None, "GPU-hours", f"no measured {step} rate on {device}: run bench/annotate.py there"))
            continue
        fig, caveat = rate
        out.append(Estimate("annotate", f"{step} ({gen.model})", pairs / fig.value / 3600, "GPU-hours", fig.source, f"{pairs:,} / {fig.value:,.1f} per s",
                            "; ".join(c for c in (caveat, "retries not counted") if c)))
    return out


def annotate_rate(annotate, step: str, gen, device: str) -> tuple[Figure, str] | None:
    if annotate:
        for i, r in enumerate(annotate[1].get("results", [])):
            if not isinstance(r, dict) or r.get("backend", gen.backend) != gen.backend:  # the stage's backend, not a baseline
                continue
            if step in str(r.get("step", r.get("role", ""))) and _same_model(r.get("model"), gen.model):
                field = next((f for f in ("pairs_per_s", "requests_per_s") if f in r), None)
                if field:
                    return Figure(r[field], f"{annotate[0]}: results[{i}].{field}"), ""
    batch = getattr(gen, "batch_size", None)
    if step == "describe":
        caveat = f"measured for a Qwen2-VL-2B shape at 128 new tokens; the config runs {gen.model}, {gen.max_new_tokens} new tokens, batch {batch}"
        shaped = _shape_row(annotate, gen.backend, batch)
        if shaped:
            return shaped, caveat
        fig = design("describe-b256" if batch and batch >= 256 else "describe-b64", device)
    else:
        fig = design("instruct-b128", device)
        caveat = f"measured for a Llama-3-8B shape at 96 new tokens; the config runs {gen.model}, {gen.max_new_tokens} new tokens, batch {batch}"
    return (fig, caveat) if fig else None


def _shape_row(annotate, backend: str, batch: int | None) -> Figure | None:
    """The annotate benchmark's own run of the Qwen2-VL-2B shape on this backend, nearest batch size first."""
    if not annotate:
        return None
    rows = [(i, r) for i, r in enumerate(annotate[1].get("results", []))
            if isinstance(r, dict) and r.get("backend") == backend and str(r.get("model", "")).startswith(QWEN2_VL_2B_SHAPE)]  # fmt: skip
    if not rows:
        return None
    i, r = min(rows, key=lambda ir: abs((ir[1].get("batch_size") or 0) - (batch or 0)))
    return Figure(r["pairs_per_s"], f"{annotate[0]}: results[{i}].pairs_per_s ({r['model']}, batch {r.get('batch_size')})")


def write_estimates(config: RunConfig, images: int, queries: int, pairs: int, demo_triplets: Path) -> list[Estimate]:
    w, m = config.write, config.mine
    referenced = min(images, queries * (1 + m.pairs_per_query * (1 + m.hard_negatives)))
    written = 2 * pairs + referenced
    size = jpeg_size(demo_triplets, w.image_side, w.jpeg_quality)
    basis = f"(2 x {pairs:,} triplet images + {referenced:,} referenced images, at most the corpus) x bytes per image"
    if size is None:
        return [Estimate("write", "JPEGs in the triplet and image shards", None, "bytes", "no demo output and no sample photos to measure a JPEG's size")]
    return [Estimate("write", f"{w.image_side}px JPEGs in the triplet and image shards", written * size.value, "bytes", size.source, basis,
                     "plus 512 B of tar header per member")]


def jpeg_size(demo_triplets: Path, side: int, quality: int) -> Figure | None:
    """Mean bytes of a written JPEG: from the demo's image shards if present, else measured on scikit-image's photos."""
    sizes = []
    demo_config = Path(demo_triplets).parent / "config.yaml"
    written = yaml.safe_load(demo_config.read_text()).get("write", {}) if demo_config.is_file() else {}
    same = (written.get("image_side"), written.get("jpeg_quality")) == (side, quality)  # else the demo's JPEGs say nothing
    for t in sorted(Path(demo_triplets).glob("images/*.tar")) if same else []:
        with tarfile.open(t) as tar:
            sizes += [m.size for m in tar.getmembers() if m.name.endswith(".jpg")]
    if sizes:
        return Figure(sum(sizes) / len(sizes), f"{demo_triplets}/images/*.tar: mean of {len(sizes)} written JPEGs (synthetic scenes)")
    try:
        import skimage.data
        from PIL import Image
    except ImportError:
        return None
    from stages.write import encode_jpeg  # the write stage's own resize and encode

    photos = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
    total = 0
    for name in photos:
        total += len(encode_jpeg(Image.fromarray(getattr(skimage.data, name)()), side, quality))
    return Figure(total / len(photos), f"measured now: {len(photos)} scikit-image photos at {side} px, JPEG quality {quality} (mean)")


def totals(estimates: list[Estimate], unit: str) -> dict:
    """Sums of what was estimated; the whole-stage embed figure stands for its spaces."""
    known = [e for e in estimates if e.value is not None]
    model = [e for e in known if e.unit == unit and not (e.stage == "embed" and not e.what.startswith("whole stage"))]
    return {
        "model_hours": sum(e.value for e in model),
        "model_hours_unit": unit,
        "cpu_hours": sum(e.value for e in known if e.unit == "CPU-hours"),
        "storage_bytes": sum(e.value for e in known if e.unit == "bytes" and "memory" not in e.what),
        "not_estimated": [f"{e.stage}: {e.what}" for e in estimates if e.value is None],
    }


# --- output ----------------------------------------------------------------------------------


def format_plan(plan: dict, title: str = "") -> str:
    lines = [f"megasynth plan{': ' + title if title else ''}: {plan['images']:,} images, {plan['queries']:,} queries, "
             f"{plan['pairs']:,} pairs, device {plan['device']}"]
    lines.append("benchmark results: " + ", ".join(f"{b} {f or 'none'}" for b, f in plan["results"].items()))
    stage = None
    for e in plan["estimates"]:
        if e["stage"] != stage:
            stage = e["stage"]
            lines.append(f"\n{stage}")
        lines.append(f"  {e['what']}: {_value(e['value'], e['unit'])}" + (f"   [{e['basis']}]" if e["basis"] else ""))
        lines.append(f"      from: {e['source']}" + (f"\n      note: {e['caveat']}" if e["caveat"] else ""))
    t = plan["totals"]
    lines.append(f"\ntotal: {t['model_hours']:,.1f} {t['model_hours_unit']}, {t['cpu_hours']:,.1f} CPU-hours, {_value(t['storage_bytes'], 'bytes')} on disk")
    if t["not_estimated"]:
        lines.append("not estimated (not in the totals): " + "; ".join(t["not_estimated"]))
    return "\n".join(lines)


def _value(v: float | None, unit: str) -> str:
    if v is None:
        return "not estimated"
    if unit == "bytes":
        for u, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
            if v >= scale:
                return f"{v / scale:,.1f} {u}"
        return f"{v:,.0f} B"
    if unit == "pairs":
        return f"{v:,.0f} pairs"
    return f"{v:,.2f} {unit}"


def plan_command(config_path: str | Path, images: str, device: str | None = None, results_dir: Path = RESULTS, as_json: bool = False) -> str:
    """What `megasynth plan CONFIG --images 20M [--device h200] [--json]` prints."""
    plan = estimate(load_config(config_path), parse_count(images), results_dir, device)
    return json.dumps(plan, indent=1) if as_json else format_plan(plan, str(config_path))
