"""`megasynth plan`: units and workers, GPU-hours, memory and storage per stage for a corpus of a given size.

Units come from counts alone (no files): the same sizes the stages' `plan` cuts their inputs
into. Every estimate is an extrapolation from one measured figure, and says which: a field of a
benchmark result under bench/results/ (`{bench}-{device}.json`, written by `megasynth bench embed`,
`... mine`, `... annotate`) when one was measured for the config's model on that device, else
the design notes' H200 figures in bench/results/reference-h200.json. A rate measured on another
model's shape is scaled by what costs (parameters x tokens) and says so. What neither covers is
reported as not estimated, with the benchmark that would measure it.
"""

from __future__ import annotations

import functools
import json
import re
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from pipeline.config import RunConfig, load_config
from stages import neighbours
from stages import units as stage_units

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"
DEMO_TRIPLETS = RESULTS.parent.parent / "runs" / "demo" / "triplets"  # where `make demo` writes, from the checkout
REFERENCE_FILE = RESULTS / "reference-h200.json"
REFERENCE = "bench/results/reference-h200.json"  # how estimates cite it: a file of this repository
REFERENCE_DEVICE = "h200"  # the device of the reference figures, and the default for configs that run on a GPU


@dataclass(frozen=True)
class Figure:
    """One measured number and where it comes from; for a model's rate, the shape it was measured on."""

    value: float
    source: str
    model: str | None = None  # the model whose shape ran (hub id), to scale the rate to another by cost
    params: float | None = None
    prompt_tokens: float | None = None
    new_tokens: float | None = None


@functools.lru_cache(maxsize=None)
def reference_figures(path: Path = REFERENCE_FILE) -> dict[str, Figure]:
    """The design notes' H200 measurements as bench/results/reference-h200.json holds them; {} without the file
    (an installed package has no bench/ folder)."""
    if not Path(path).is_file():
        return {}
    figures = {}
    for key, f in json.loads(Path(path).read_text())["figures"].items():
        source = f"{REFERENCE}: {key} (the design notes' H200 measurement, random weights): {f['what']}, {f['value']:,} {f['unit']}"
        value = f["value"]
        if key == "knn-torch":  # seconds for a known matmul -> effective TFLOP/s
            key, value = "knn-torch-tflops", 2 * f["base"] * f["queries"] * f["dim"] / f["value"] / 1e12
        figures[key] = Figure(value, source, f.get("model"), f.get("params"), f.get("prompt_tokens"), f.get("new_tokens"))
    return figures


# Which reference figure measured which hub model (image towers only: the notes have no text tower).
REFERENCE_MODELS = {"openai/clip-vit-large-patch14": "clip-vit-l14-vision", "facebook/dinov2-base": "dinov2-b14"}
ASSUMED_DIM = Figure(768, "assumed: 768 dims, the width the design notes size storage with (20M x 768 x fp16 = 31 GB per space)")
# bench/annotate.py labels its rows with this when it runs random weights in the describer shape the notes measured.
QWEN2_VL_2B_SHAPE = "Qwen2-VL-2B shape"
QWEN2_VL_2B = "Qwen/Qwen2-VL-2B-Instruct"
# Parameters of the models configs name and their near relatives, counted with transformers on the meta
# device from each model's published config (tests/test_plan.py recounts some through `counted_params`).
KNOWN_PARAMS = {
    "Qwen/Qwen2-VL-2B-Instruct": 2_208_985_600,
    "Qwen/Qwen2-VL-7B-Instruct": 8_291_375_616,
    "Qwen/Qwen2-VL-72B-Instruct": 73_405_560_320,
    "Qwen/Qwen2.5-VL-3B-Instruct": 3_754_622_976,
    "Qwen/Qwen2.5-VL-7B-Instruct": 8_292_166_656,
    "meta-llama/Meta-Llama-3-8B": 8_030_261_248,
    "meta-llama/Meta-Llama-3-8B-Instruct": 8_030_261_248,
    "meta-llama/Llama-3.1-8B-Instruct": 8_030_261_248,
    "meta-llama/Meta-Llama-3-70B-Instruct": 70_553_706_496,
}
SHARD_ROWS = 10_000  # img2dataset's default samples per shard: ingest and embed units and the mine memory formulas need a size
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


# --- what a model costs ----------------------------------------------------------------------


def model_params(model: str) -> tuple[float, str] | None:
    """(parameters, where the count comes from) of a model folder (its config.json) or a hub id in KNOWN_PARAMS."""
    folder = Path(model).expanduser()
    if (folder / "config.json").is_file():
        n = counted_params(str(folder.resolve()))
        return (n, f"{folder}/config.json") if n else None
    wanted = model.strip("/").lower()
    for name, n in KNOWN_PARAMS.items():
        if wanted in (name.lower(), name.split("/")[-1].lower()):
            return n, "pipeline/plan.py: KNOWN_PARAMS"
    return None


@functools.lru_cache(maxsize=None)
def counted_params(folder: str) -> int | None:
    """Parameters of the model a config.json describes, built on the meta device (no weights read);
    None for an architecture transformers does not ship (remote code is never run here)."""
    import torch
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(folder)
    except (ValueError, OSError, KeyError):
        return None
    classes = [getattr(transformers, a, None) for a in (config.architectures or [])]
    autos = (transformers.AutoModelForImageTextToText, transformers.AutoModelForCausalLM, transformers.AutoModel)
    for cls in [c for c in classes if c is not None] + list(autos):
        try:
            with torch.device("meta"):
                model = cls(config) if cls not in autos else cls.from_config(config)
        except (ValueError, TypeError, KeyError, AttributeError, ImportError):  # not this class, or its code is missing here
            continue
        return sum(p.numel() for p in model.parameters())
    return None


def scale_by_cost(rate: float, measured_params: float, measured_tokens: float, params: float, tokens: float) -> float:
    """A generation rate measured on one model shape, for another: time per request goes as parameters x tokens."""
    return rate * (measured_params / params) * (measured_tokens / tokens)


def _billions(n: float) -> str:
    return f"{n / 1e9:.2f}B"


# --- per stage -------------------------------------------------------------------------------


def estimate(config: RunConfig, images: int, results_dir: Path = RESULTS, device: str | None = None, demo_triplets: Path = DEMO_TRIPLETS,
             gpus: int | None = None, cpus: int | None = None) -> dict:  # fmt: skip
    """Every stage's units and estimates for a corpus of `images` images, each estimate naming the figure it
    extrapolates from; with `gpus` and/or `cpus`, the workers each stage keeps busy."""
    device = device or default_device(config)
    found = {b: load_result(results_dir, b, device) for b in ("embed", "mine", "annotate")}
    mined = mined_count(config, images)
    queries = query_count(config, images)
    pairs = queries * config.mine.pairs_per_query
    dims = {name: space_dim(found["embed"], name, sp.model) for name, sp in config.embed.spaces.items()}
    estimates = [
        *ingest_estimates(found["embed"], images, device),
        *embed_estimates(config, found["embed"], images, dims, device),
        *mine_estimates(config, found["mine"], mined, queries, dims, device),
        *annotate_estimates(config, found["annotate"], pairs, device),
        *write_estimates(config, images, queries, pairs, demo_triplets),
    ]
    for e in estimates:  # estimates are written in GPU-hours; on the CPU the same figures are worker-hours
        e.unit = hours_unit(device) if e.unit == "GPU-hours" else e.unit
    cluster = cluster_size(gpus, cpus)
    stages = unit_plan(config, images, cluster["gpus"], cluster["cpus"])
    return {
        "images": images,
        "queries": queries,
        "pairs": pairs,
        "device": device,
        "results": {b: (r[0] if r else None) for b, r in found.items()},
        "cluster": cluster,
        "units": [asdict(s) for s in stages],
        "warnings": [w for s in stages for w in unit_warnings(s)],
        "estimates": [asdict(e) for e in estimates],
        "totals": totals(estimates, hours_unit(device)),
    }


# --- units and workers -----------------------------------------------------------------------

CPUS_PER_GPU = 16  # assumed when only --gpus is given: an 8-GPU node has about 128 cores


@dataclass
class Wave:
    """Units that run side by side; the next wave starts when all are done."""

    what: str  # what one unit is
    units: int
    sized: bool = True  # False: a global step (an index per space, the dataset's index), one unit by nature


@dataclass
class StageUnits:
    stage: str
    waves: list[Wave]
    sized_by: str  # what to change for more, smaller units
    cpus: float  # what one worker needs
    gpus: float
    workers: int | None = None  # None: no cluster size given


def cluster_size(gpus: int | None, cpus: int | None) -> dict:
    """GPUs and CPUs to plan workers for; CPUs assumed from the GPUs when not given."""
    if gpus is not None and gpus < 0 or cpus is not None and cpus < 1:
        raise ValueError("--gpus must be >= 0 and --cpus >= 1")
    assumed = cpus is None and bool(gpus)
    return {"gpus": gpus, "cpus": CPUS_PER_GPU * gpus if assumed else cpus, "cpus_assumed": assumed}


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def shard_units(images: int, shard_images: int = SHARD_ROWS) -> int:
    """ingest and embed: one unit per corpus shard (img2dataset writes shards of 10,000 images by default)."""
    return _ceil_div(images, shard_images)


def query_units(images: int, queries: int, queries_per_unit: int, corpus_fraction: float = 1.0) -> int:
    """search: catalog rows cut so that each unit holds about `queries_per_unit` queries (stages/search.py)."""
    mined = round(images * corpus_fraction)
    if not queries or not mined:
        return 0
    share = neighbours.threshold(queries / mined) / neighbours.FULL * corpus_fraction  # the stage's share of catalog rows
    return _ceil_div(images, stage_units.rows_per_unit(queries_per_unit, share))


def image_units(pairs: int, triplets_per_unit: int, images_per_unit: int, pairs_per_query: int, hard_negatives: int, images: int) -> int:
    """write's image units: each triplets unit counts its own images (queries shared by their pairs, targets,
    hard negatives), and their sum is cut into `images_per_unit` (stages/write.py)."""
    def referenced(p: int) -> int:
        return min(images, _ceil_div(p, pairs_per_query) + p * (1 + hard_negatives))

    full, rest = divmod(pairs, triplets_per_unit)
    return max(1, _ceil_div(full * referenced(triplets_per_unit) + referenced(rest), images_per_unit))


def on_gpu(device: str, gpus: int | None) -> bool:
    """Whether a stage's device setting puts its workers on the cluster's GPUs."""
    return device == "cuda" or (device == "auto" and bool(gpus))


def generator_gpus(gen, gpus: int | None) -> float:
    """GPUs one annotate worker holds for a describer or instructor (stages/annotation/backends.py gpus_needed)."""
    if gen.backend == "transformers":
        return 1.0 if on_gpu(gen.device, gpus) else 0.0
    if gen.backend == "vllm":
        return float(gen.tensor_parallel_size)  # with TP > 1, vLLM's own Ray workers hold them
    return 0.0  # openai: the server's GPUs, not the cluster's


def worker_count(cpus_per_worker: float, gpus_per_worker: float, cpus: int | None, gpus: int | None, actors: int | None = None) -> int:
    """Workers that fit at once, as the Ray executor fits them; `executor.actors` caps a model stage's."""
    fits = [int((gpus or 0) // gpus_per_worker)] if gpus_per_worker else []
    fits += [int((cpus or 0) // cpus_per_worker)] if cpus_per_worker else []
    n = min(fits) if fits else 0
    return min(n, actors) if actors else n


def caption_worker(c, gpus: int | None) -> tuple[float, float]:
    """CPUs and GPUs of one caption worker: a captioner's when it may generate, else a CPU task reading captions."""
    if not c.generates:
        return 1.0, 0.0
    return c.cpus, c.gpus if c.gpus is not None else generator_gpus(c.captioner, gpus)


def unit_plan(config: RunConfig, images: int, gpus: int | None = None, cpus: int | None = None) -> list[StageUnits]:
    """Units per stage from counts alone, as each stage's `plan` would cut them; workers when a cluster size is given."""
    e, m, a, w = config.embed, config.mine, config.annotate, config.write
    queries = query_count(config, images)
    pairs = queries * m.pairs_per_query
    folders = config.corpus.format == "folder"  # image folders are cut into shards of corpus.folder_shard_size
    shards = shard_units(images, config.corpus.folder_shard_size if folders else SHARD_ROWS)
    searches = query_units(images, queries, m.queries_per_unit, m.corpus_fraction)
    spaces = len(m.spaces or e.spaces)
    index = [Wave("an index of one space", spaces, sized=False)] if m.backend == "faiss" and m.index != "Flat" else []
    triplets = _ceil_div(pairs, w.triplets_per_unit)
    written = image_units(pairs, w.triplets_per_unit, w.images_per_unit, m.pairs_per_query, m.hard_negatives, images)
    annotate_gpus = a.gpus if a.gpus is not None else max(generator_gpus(a.describer, gpus), generator_gpus(a.instructor, gpus))
    shard = f"a corpus shard (~{config.corpus.folder_shard_size:,} images)" if folders else f"a corpus shard (~{SHARD_ROWS:,} images, img2dataset's default)"
    stages = [
        StageUnits("ingest", [Wave(shard, shards)], "the corpus's shards (reshard it smaller)", config.ingest.cpus, 0.0),
        StageUnits("caption", [Wave("a catalog shard, one per corpus shard", shards)], "the corpus's shards (reshard it smaller)",
                   *caption_worker(config.caption, gpus)),
        StageUnits("embed", [Wave("a catalog shard, one per corpus shard", shards)], "the corpus's shards (reshard it smaller)", e.cpus,
                   e.gpus if e.gpus is not None else float(on_gpu(e.device, gpus))),
        StageUnits("select", select_waves(config, shards), "the corpus's shards (reshard it smaller)", config.select.cpus, 0.0),
        StageUnits("search", [*index, Wave(f"~{m.queries_per_unit:,} queries", searches)], "mine.queries_per_unit", m.cpus,
                   m.gpus if m.gpus is not None else float(on_gpu(m.device, gpus))),
        StageUnits("mine", [Wave("one search unit's neighbour lists", searches)], "mine.queries_per_unit (one unit per search unit)", m.cpus, 0.0),
        StageUnits("annotate", [Wave(f"~{a.pairs_per_unit:,} pairs", _ceil_div(pairs, a.pairs_per_unit))], "annotate.pairs_per_unit", a.cpus, annotate_gpus),
        StageUnits("write", [Wave(f"~{w.triplets_per_unit:,} triplets", triplets), Wave(f"<= {w.images_per_unit:,} referenced images", written),
                             Wave("the dataset's index.jsonl", 1, sized=False)], "write.triplets_per_unit, write.images_per_unit", w.cpus, 0.0),
    ]  # fmt: skip
    if gpus is not None or cpus is not None:
        model_stages = {"embed", "search", "annotate"} | ({"caption"} if config.caption.generates else set())  # actors: `executor.actors` caps them
        for s in stages:
            s.workers = worker_count(s.cpus, s.gpus, cpus, gpus, config.executor.actors if s.stage in model_stages else None)
    return stages


def select_waves(config: RunConfig, shards: int) -> list[Wave]:
    """select (stages/select.py): one unit that selects everything without queries; else the queries encoded,
    every catalog shard scored, the top-N cutoffs merged, every shard's selection written."""
    if not config.select.queries:
        return [Wave("every image selected (no select.queries)", 1, sized=False)]
    return [Wave("the queries, encoded", 1, sized=False), Wave("a catalog shard scored", shards),
            Wave("the top-N cutoffs", 1, sized=False), Wave("a catalog shard's selection", shards)]


def unit_warnings(s: StageUnits) -> list[str]:
    """A line for a stage that leaves workers idle: fewer units in a wave than workers, or no worker that fits."""
    if s.workers is None:
        return []
    if s.workers == 0:
        return [f"{s.stage}: no worker fits: each needs {_needs_text(s.cpus, s.gpus)}"]
    return [f"{s.stage}: {wave.units:,} units ({wave.what}) for {s.workers:,} workers, {s.workers - wave.units:,} idle; "
            f"for more units: {s.sized_by}" for wave in s.waves if wave.sized and wave.units < s.workers]  # fmt: skip


def hours_unit(device: str) -> str:
    """Model stages' time: GPU-hours on a GPU, worker-hours (a worker's CPUs busy) on the CPU."""
    return "worker-hours" if device == "cpu" else "GPU-hours"


def default_device(config: RunConfig) -> str:
    return "cpu" if config.embed.device == "cpu" else REFERENCE_DEVICE


def reference(key: str, device: str) -> Figure | None:
    """A figure of bench/results/reference-h200.json, only for the device it was measured on."""
    return reference_figures().get(key) if device == REFERENCE_DEVICE else None


def mined_count(config: RunConfig, images: int) -> int:
    """Images in the mined corpus (`mine.corpus_fraction` of it): the base every query is searched against. When every
    select query keeps a top_n, at most their sum are selected; a threshold's count is known only once it has run."""
    queries = config.select.queries
    if queries and all(q.top_n is not None for q in queries):
        images = min(images, sum(q.top_n for q in queries))
    return round(images * config.mine.corpus_fraction)


def query_count(config: RunConfig, images: int) -> int:
    """Queries: `mine.queries` of the mined corpus (a count, a share, or every image)."""
    q, mined = config.mine.queries, mined_count(config, images)
    if q is None:
        return mined
    if isinstance(q, float):
        return round(q * mined)
    return min(q, mined)


def space_dim(embed: tuple[str, dict] | None, space: str, model: str) -> Figure:
    """Output dimension of a space: measured by the embed benchmark, else the model folder's config, else 768, assumed."""
    entry = embed_entry(embed, space, model)
    if entry and entry[1].get("dim"):
        return Figure(entry[1]["dim"], f"{entry[0]}: results[space={space}].dim")
    cfg = Path(model).expanduser() / "config.json"
    if cfg.is_file():
        c = json.loads(cfg.read_text())
        dim = c.get("projection_dim") or c.get("hidden_size") or c.get("head_channels")  # head_channels: efficientnet_lite's pooled width
        if dim:
            return Figure(dim, f"{cfg}: projection_dim / hidden_size / head_channels")
    return ASSUMED_DIM


def ingest_estimates(embed, images: int, device: str) -> list[Estimate]:
    rate = pil_rate(embed, device)
    if rate is None:
        return [Estimate("ingest", "decode every image (CPU)", None, "CPU-hours", f"no PIL decode figure for {device}: run `megasynth bench embed` there")]
    return [Estimate("ingest", "decode every image (CPU)", images / rate.value / 3600, "CPU-hours", rate.source, f"{images:,} images / {rate.value:,.0f} images/s per core")]


def pil_rate(embed, device: str) -> Figure | None:
    if embed:
        for r in embed[1].get("results", []):
            if r.get("decoder") == "pil" and r.get("threads") == 1:
                return Figure(r["images_per_s"], f"{embed[0]}: results[decoder=pil, threads=1].images_per_s (decode only, no resize)")
    return reference("pil-decode-per-core", device)


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
    key = REFERENCE_MODELS.get(sp.model) if sp.kind == "image" else None
    fig = reference(key, device) if key else None
    if fig:
        return Estimate("embed", what, images / fig.value / 3600, "GPU-hours", fig.source, f"{images:,} / {fig.value:,.0f} per s",
                        "a raw forward rate: the stage adds decode and preprocessing (target: >= 85% of it)")
    return Estimate("embed", what, None, "GPU-hours", f"no measured figure for this model on {device}: run `megasynth bench embed` there")


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
    return Estimate("embed", "GPU memory per worker", None, "bytes", "not measured: run `megasynth bench embed` on the GPU")


def mine_estimates(config: RunConfig, mine, base: int, queries: int, dims: dict[str, Figure], device: str) -> list[Estimate]:
    m = config.mine
    backend, index = getattr(m, "backend", "faiss"), getattr(m, "index", "Flat")
    spaces = m.spaces or list(config.embed.spaces)
    if backend == "faiss" and index != "Flat":
        return [Estimate("mine", f"search, {index}", None, "GPU-hours", "approximate index: its cost is not a FLOP count; measure it with `megasynth bench mine`")]
    rate = knn_rate(mine, backend, device)
    out = []
    for name in spaces:
        d = dims[name].value if name in dims else ASSUMED_DIM.value
        flop = 2 * queries * base * d
        if rate is None:
            out.append(Estimate("mine", f"{name}: exact search", None, "GPU-hours", f"no kNN figure for backend {backend} on {device}: run `megasynth bench mine` there"))
            continue
        caveat = rate[1]
        out.append(Estimate("mine", f"{name}: exact search ({backend})", flop / (rate[0].value * 1e12) / 3600, "GPU-hours", rate[0].source,
                            f"2 x {queries:,} queries x {base:,} base x {d:.0f} dims = {flop:.2e} FLOP at {rate[0].value:,.0f} TFLOP/s", caveat))
    out.extend(mine_memory(config, queries, max((dims[s].value for s in spaces if s in dims), default=768), len(spaces)))
    return out


def knn_rate(mine, backend: str, device: str) -> tuple[Figure, str] | None:
    """Effective TFLOP/s of exact search: the best measured for this backend, else the reference torch figure."""
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
    fig = reference("knn-torch-tflops", device)
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
    for step, gen in (("describe", a.describer), ("instruct", a.instructor)):
        fig, caveat = annotate_rate(annotate, step, gen, device)
        if fig is None:
            out.append(Estimate("annotate", f"{step} ({gen.model})", None, "GPU-hours", caveat))
            continue
        out.append(Estimate("annotate", f"{step} ({gen.model})", pairs / fig.value / 3600, "GPU-hours", fig.source, f"{pairs:,} / {fig.value:,.2f} per s",
                            "; ".join(c for c in (caveat, "retries not counted") if c)))
    return out


def annotate_rate(annotate, step: str, gen, device: str) -> tuple[Figure | None, str]:
    """(requests/s, caveat) of one annotate step: measured for the config's model, else a measured shape's rate
    scaled to it by cost; (None, why not) when neither is possible."""
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
        measured = _shape_row(annotate, gen.backend, batch) or reference("describe-b256" if batch and batch >= 256 else "describe-b64", device)
    else:
        measured = reference("instruct-b128", device)
    if measured is None:
        return None, f"no measured {step} rate on {device}: run `megasynth bench annotate` there"
    return scaled_to(measured, gen, batch)


def scaled_to(measured: Figure, gen, batch: int | None) -> tuple[Figure | None, str]:
    """A rate measured on `measured.model`'s shape, scaled to the config's model and new tokens by cost."""
    shape = measured.model.split("/")[-1]
    cost = model_params(gen.model)
    if cost is None or not measured.params:
        return None, (f"{measured.source}; but the parameters of {gen.model} are unknown (no config.json, not in pipeline/plan.py's "
                      f"KNOWN_PARAMS), so that rate cannot be scaled to it: run `megasynth bench annotate` with it")  # fmt: skip
    params, counted_from = cost
    tokens_note = ""
    if measured.prompt_tokens is not None and measured.new_tokens is not None:
        measured_tokens, tokens = measured.prompt_tokens + measured.new_tokens, measured.prompt_tokens + gen.max_new_tokens
        tokens_note = f" and tokens {measured_tokens:,.0f}/{tokens:,.0f} (prompt + new)"
    else:
        measured_tokens = tokens = 1.0
        tokens_note = " (tokens not scaled: the measurement does not record them)"
    value = scale_by_cost(measured.value, measured.params, measured_tokens, params, tokens)
    source = measured.source
    if (measured.params, measured_tokens) != (params, tokens):
        source += f"; scaled from {shape} by params {_billions(measured.params)}/{_billions(params)} ({counted_from}){tokens_note}"
    prompt = f"prompt tokens assumed as measured ({measured.prompt_tokens:,.0f}); " if measured.prompt_tokens is not None else ""
    caveat = f"measured on the {shape} shape with random weights; {prompt}the config runs {gen.model} ({gen.backend}, batch {batch})"
    return Figure(value, source), caveat


def _shape_row(annotate, backend: str, batch: int | None) -> Figure | None:
    """The annotate benchmark's own run of the Qwen2-VL-2B shape on this backend, nearest batch size first."""
    if not annotate:
        return None
    rows = [(i, r) for i, r in enumerate(annotate[1].get("results", []))
            if isinstance(r, dict) and r.get("backend") == backend and str(r.get("model", "")).startswith(QWEN2_VL_2B_SHAPE)]  # fmt: skip
    if not rows:
        return None
    i, r = min(rows, key=lambda ir: abs((ir[1].get("batch_size") or 0) - (batch or 0)))
    p = _params(annotate)
    return Figure(r["pairs_per_s"], f"{annotate[0]}: results[{i}].pairs_per_s ({r['model']}, batch {r.get('batch_size')})",
                  QWEN2_VL_2B, KNOWN_PARAMS[QWEN2_VL_2B], p.get("prompt_tokens_mean"), p.get("max_new_tokens"))


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
    lines.extend(format_units(plan))
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


def format_units(plan: dict) -> list[str]:
    c = plan["cluster"]
    if c["gpus"] is None and c["cpus"] is None:
        head = "units per stage (workers: give --gpus and/or --cpus):"
    else:
        cpus = f"{c['cpus']:,} CPUs" + (f" ({CPUS_PER_GPU} per GPU, assumed: set --cpus)" if c["cpus_assumed"] else "")
        head = f"units per stage, and the workers that fit at once on {c['gpus'] or 0:,} GPUs and {cpus}:"
    lines = ["", head]
    for s in plan["units"]:
        waves = ", then ".join(f"{w['units']:,} x {w['what']}" for w in s["waves"])
        line = f"  {s['stage']:<9} {waves}"
        if s["workers"] is not None:
            widest = max((w["units"] for w in s["waves"] if w["sized"]), default=1)
            each = f", {widest / s['workers']:,.1f} units each" if s["workers"] else ""
            line += f"\n  {'':<9} {s['workers']:,} worker{'s' if s['workers'] != 1 else ''} of {_needs_text(s['cpus'], s['gpus'])}{each}"
        lines.append(line)
    lines.extend(f"warning: {w}" for w in plan["warnings"])
    return lines


def _needs_text(cpus: float, gpus: float) -> str:
    text = f"{cpus:g} CPU" + ("s" if cpus != 1 else "")
    return f"{gpus:g} GPU + {text}" if gpus else text


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


def plan_command(config_path: str | Path, images: str, device: str | None = None, results_dir: Path = RESULTS, as_json: bool = False,
                 gpus: int | None = None, cpus: int | None = None) -> str:  # fmt: skip
    """What `megasynth plan CONFIG --images 20M [--gpus 64] [--cpus 1024] [--device h200] [--json]` prints."""
    plan = estimate(load_config(config_path), parse_count(images), results_dir, device, gpus=gpus, cpus=cpus)
    return json.dumps(plan, indent=1) if as_json else format_plan(plan, str(config_path))
