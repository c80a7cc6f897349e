"""Annotation throughput: pairs/s and generated tokens/s per backend, against plain `generate`.

    python -m bench.annotate --cpu                       # the tiny demo-shaped describer, CPU-sized
    python -m bench.annotate                             # on a GPU: random weights in Qwen2-VL-2B's shape
    python -m bench.annotate --describer assets/models/describer-tiny-llava   # a describer folder you have
    python -m bench.annotate --openai-url http://host:8000/v1 --openai-model Qwen/Qwen2-VL-2B-Instruct

Side by side in one run, on the same requests (two images + the describe prompt per pair):
- `plain_generate`: what a user writes with transformers alone: the processor on a batch of
  64 requests in arrival order, `model.generate(do_sample=True)`;
- `transformers_backend`: the annotate stage's backend at the same batch size, and at a
  larger one (length-sorted batches, left padding, per-request seeded sampling);
- `openai_backend`: an endpoint you name (vLLM serve, SGLang, TGI), at its concurrency;
- `openai_client_ceiling`: the openai backend against a server on 127.0.0.1 (its own process)
  that answers at once with a fixed completion: what one annotate worker's client costs
  (image encoding, JSON, HTTP) as CPU ms per pair, so 1000 / that is the most pairs/s one
  core can send before the client, not the server, limits;
- `vllm_backend`: vLLM's offline engine, where vllm imports.
Speed-ups are each backend's pairs/s over plain_generate's, measured in the same run.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import random
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

from bench.common import median_seconds, write_result


def _corpus_pairs(n: int, seed: int, workdir: Path) -> list[tuple]:
    from PIL import Image

    from demo.corpus import make_corpus

    make_corpus(workdir / "corpus", max(2 * n, 64), seed=seed, shard_size=256)
    items = []
    for path in sorted(glob.glob(str(workdir / "corpus" / "*.tar"))):
        with tarfile.open(path) as tar:
            files: dict = {}
            for m in tar:
                key, ext = m.name.split(".", 1)
                files.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for key in sorted(files):
            meta = json.loads(files[key]["json"])
            items.append((Image.open(io.BytesIO(files[key]["jpg"])).convert("RGB"), meta["caption"] or meta["re_caption"] or ""))
    rng = random.Random(seed)
    return [tuple(rng.sample(items, 2)) for _ in range(n)]


def _requests(pairs, image_side: int):
    from stages.annotation.backends import ChatRequest
    from stages.annotation.prompts import describe_text, load_prompt

    template = load_prompt("describe-v1")
    out = []
    def sized(img):  # the longer side at image_side, as the annotate stage sends a full-size corpus image
        scale = image_side / max(img.size)
        return img.resize((round(img.width * scale), round(img.height * scale)))

    for i, ((qi, qc), (ti, tc)) in enumerate(pairs):
        out.append(ChatRequest(describe_text(template, qc, tc, 60 + i % 41), (sized(qi), sized(ti)), seed=i))
    return out


# Qwen2-VL-2B's language model (Qwen2-1.5B) and a 0.6B ViT at 256 tokens per 448px image.
QWEN2_VL_2B_TEXT = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2)
VIT_448 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, image_size=448, patch_size=28)
QWEN2_VOCAB = 151_936


def real_shape_describer(folder: Path, pairs, device: str, small: bool = False) -> Path:
    """Random weights in the compute shape of DESIGN.md's describer: Qwen2-VL-2B's language model
    (28 layers, width 1536, 12/2 query/KV heads, 151,936-token vocabulary) behind a 0.6B ViT that
    gives 256 tokens per 448px image, so that two images and the describe prompt make about the
    612 prompt tokens measured there. LLaVA's architecture rather than Qwen2-VL's, whose processor
    needs torchvision; the ViT sees 256 patches of 28px where Qwen2-VL's sees 1024 of 14px merged
    2x2, about a quarter of its vision compute. The tokenizer is trained here on the prompts (no hub).
    `small` keeps the vocabulary and the 256 tokens per image but shrinks the towers: only to check
    this code path on a CPU."""
    import torch

    from demo import toy_models as dm
    from stages.annotation.prompts import describe_text, load_prompt

    template = load_prompt("describe-v1")
    tokenizer = dm.train_tokenizer([describe_text(template, qc, tc, 80) for (_, qc), (_, tc) in pairs], folder)
    vision = {**dm.TINY_VISION, "image_size": 448, "patch_size": 28} if small else VIT_448
    text = dm.TINY_TEXT if small else QWEN2_VL_2B_TEXT
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: seconds for 2B parameters on a GPU
        model = dm.describer_model(tokenizer, vision=vision, text=text, vocab_size=QWEN2_VOCAB)
    model.to(torch.bfloat16 if device == "cuda" else torch.float32).save_pretrained(folder)
    dm.describer_processor(tokenizer, image_size=448, patch_size=28).save_pretrained(folder)
    return folder


def _prompt_tokens(describer: str, requests) -> float:
    """Mean prompt tokens per request, image tokens included, as the model sees them."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(describer)
    sample = requests[:16]
    prompts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": r.text}]}],
                                             add_generation_prompt=True, tokenize=False) for r in sample]  # fmt: skip
    ids = processor(text=prompts, images=[list(r.images) for r in sample])["input_ids"]
    return round(sum(len(x) for x in ids) / len(ids), 1)


def _count_tokens(tokenizer, texts: list[str]) -> int:
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def plain_generate(model_dir: str, requests, batch_size: int, max_new_tokens: int, device: str) -> dict:
    """The baseline: transformers alone, batches in arrival order, the model's own sampling."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.bfloat16 if device == "cuda" else torch.float32).to(device).eval()
    texts = []

    def run() -> None:
        texts.clear()
        for s in range(0, len(requests), batch_size):
            batch = requests[s : s + batch_size]
            prompts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": r.text}]}],
                                                     add_generation_prompt=True, tokenize=False) for r in batch]  # fmt: skip
            inputs = processor(text=prompts, images=[list(r.images) for r in batch], padding=True, return_tensors="pt").to(device)
            with torch.inference_mode():
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.7, top_p=0.9)
            texts.extend(processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True))

    return _timed(run, lambda: texts, processor.tokenizer, len(requests), device)


def backend(settings, requests, tokenizer, device: str) -> dict:
    from stages.annotation.backends import make_generator

    gen = make_generator(settings, vision=True)
    texts: list = []
    cpu: list[float] = []  # this process's CPU seconds per run: for a remote backend, what the client costs

    def run() -> None:
        t0 = time.process_time()
        texts[:] = [a if isinstance(a, str) else "" for a in gen.generate(requests)]
        cpu.append(time.process_time() - t0)

    result = _timed(run, lambda: texts, tokenizer, len(requests), device)
    if settings.backend == "openai":
        result["client_cpu_ms_per_pair"] = round(1000 * statistics.median(cpu[1:]) / len(requests), 3)
    return result


_INSTANT_ANSWER = json.dumps({"object": "chat.completion", "choices": [{"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": "Both images share a scene; the second differs."}}]}).encode()  # fmt: skip


def _serve_instantly(port) -> None:
    """Chat completions on 127.0.0.1 answered at once with a fixed text (runs in its own process)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real servers do

        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(_INSTANT_ANSWER)))
            self.end_headers()
            self.wfile.write(_INSTANT_ANSWER)

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 1024  # the listen backlog, as real servers have it (the default 5 drops bursts of connects)

    httpd = Server(("127.0.0.1", 0), Handler)
    port.put(httpd.server_address[1])
    httpd.serve_forever()


class _InstantServer:
    """The instant server in a child process, so that only the client's cost lands on this one."""

    def __enter__(self):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        port = ctx.Queue()
        self.proc = ctx.Process(target=_serve_instantly, args=(port,), daemon=True)
        self.proc.start()
        self.base_url = f"http://127.0.0.1:{port.get(timeout=60)}/v1"
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.join()


def _timed(run, texts, tokenizer, n: int, device: str, repeats: int = 3) -> dict:
    """Median wall time of `repeats` runs after one warm-up (kernels, caches, first allocations)."""
    import torch

    t = median_seconds(run, repeats=repeats, warmup=1, sync=torch.cuda.synchronize if device == "cuda" else None)
    seconds = t["median_s"]
    tokens = _count_tokens(tokenizer, texts()) if tokenizer is not None else None
    return {"median_s": round(seconds, 3), "min_s": round(t["min_s"], 3), "max_s": round(t["max_s"], 3), "repeats": repeats,
            "pairs_per_s": round(n / seconds, 3), "generated_tokens_per_s": round(tokens / seconds, 1) if tokens else None,
            "generated_tokens": tokens}  # fmt: skip


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m bench.annotate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="CPU-sized run (a couple of minutes on 2 cores)")
    p.add_argument("--pairs", type=int, default=None, help="requests per measurement (default 128 on CPU, 256 on GPU)")
    p.add_argument("--describer", default=None, help="a describer model folder (default: built here, see --shape)")
    p.add_argument("--shape", choices=["demo", "real"], default=None,
                   help="demo: the tiny demo describer, briefly trained; real: random weights in Qwen2-VL-2B's shape (default: demo on CPU, real on GPU)")
    p.add_argument("--small", action="store_true", help="with --shape real: shrunken towers, to check that path on a CPU")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 64 on CPU, 128 on GPU (DESIGN.md's shape)")
    p.add_argument("--image-side", type=int, default=448)
    p.add_argument("--openai-url", default=None)
    p.add_argument("--openai-model", default=None)
    p.add_argument("--openai-concurrency", type=int, default=64)
    p.add_argument("--out", type=Path, default=None, help="results folder (default: bench/results)")
    args = p.parse_args(argv)

    import torch

    from stages.annotation.backends import OpenAISettings, TransformersSettings

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    n = args.pairs or (128 if device == "cpu" else 256)
    shape = args.shape or ("demo" if device == "cpu" else "real")
    args.max_new_tokens = args.max_new_tokens or (64 if device == "cpu" else 128)
    work = Path(tempfile.mkdtemp(prefix="bench-annotate-"))
    pairs = _corpus_pairs(n, seed=0, workdir=work)
    requests = _requests(pairs, args.image_side)
    if args.describer:
        describer, shape = args.describer, "given"
    elif shape == "real":
        describer = str(real_shape_describer(work / "describer", pairs, device, small=args.small))
    else:
        from demo import toy_models

        describer = str(toy_models.build_describer(work / "describer", str(work / "corpus" / "*.tar"), steps=30))
    from transformers import AutoProcessor

    # Random weights write token ids the trained tokenizer lacks: count generated tokens only where
    # the text re-tokenizes faithfully (a real shape runs to max_new_tokens but for a rare end token).
    tokenizer = AutoProcessor.from_pretrained(describer).tokenizer if shape != "real" else None
    common = dict(model=describer, max_new_tokens=args.max_new_tokens, temperature=0.7, top_p=0.9, device=device)
    label = describer
    if shape == "demo":  # the demo describer's shape, so that `megasynth plan configs/demo.yaml` finds it
        label = "describer-tiny-llava (demo shape, 30 training steps)"
    elif shape == "real":
        from pipeline.plan import QWEN2_VL_2B_SHAPE

        label = "shrunken towers (--small), not a measurement of any shape" if args.small else f"{QWEN2_VL_2B_SHAPE} (random weights, LLaVA architecture)"
    row = lambda name, backend_, batch, r: {"name": name, "step": "describe", "backend": backend_, "model": label, "batch_size": batch, **r}  # noqa: E731
    big = min(256, n)
    results = [
        row("plain_generate", "plain generate", 64, plain_generate(describer, requests, 64, args.max_new_tokens, device)),
        row("transformers_backend", "transformers", 64, backend(TransformersSettings(batch_size=64, **common), requests, tokenizer, device)),
        row("transformers_backend", "transformers", big, backend(TransformersSettings(batch_size=big, **common), requests, tokenizer, device)),
    ]
    if args.openai_url:
        s = OpenAISettings(backend="openai", base_url=args.openai_url, model=args.openai_model or describer, max_new_tokens=args.max_new_tokens,
                           max_concurrency=args.openai_concurrency)  # fmt: skip
        results.append({**row("openai_backend", "openai", None, backend(s, requests, None, device)), "model": s.model})
    with _InstantServer() as srv:
        s = OpenAISettings(backend="openai", base_url=srv.base_url, model="instant", max_new_tokens=args.max_new_tokens,
                           max_concurrency=args.openai_concurrency)  # fmt: skip
        results.append({**row("openai_client_ceiling", "openai", None, backend(s, requests, None, device)), "model": "fixed answer on 127.0.0.1",
                        "max_concurrency": args.openai_concurrency})  # fmt: skip
    skipped = {}
    try:
        import vllm  # noqa: F401

        from stages.annotation.backends import VLLMSettings

        s = VLLMSettings(backend="vllm", model=describer, max_new_tokens=args.max_new_tokens)
        results.append(row("vllm_backend", "vllm", None, backend(s, requests, tokenizer, device)))
    except ImportError:
        skipped["vllm_backend"] = "vllm does not import here"
    base = results[0]["pairs_per_s"]
    for r in results:  # the client ceiling runs no model: no speed-up to speak of
        r["speedup_vs_plain_generate_b64"] = round(r["pairs_per_s"] / base, 2) if r["name"] != "openai_client_ceiling" else None
    described = {"demo": "tiny LLaVA-shaped demo model (demo/toy_models.py), 30 training steps",
                 "real": "random weights, Qwen2-VL-2B's language model + a 0.6B ViT (bench/annotate.py: real_shape_describer)"
                         + (", shrunken (--small)" if args.small else ""),
                 "given": describer}  # fmt: skip
    params = {"pairs": n, "device": device, "describer": described[shape], "prompt_tokens_mean": _prompt_tokens(describer, requests),
              "max_new_tokens": args.max_new_tokens, "image_side": args.image_side, "prompt": "describe-v1", "skipped": skipped}  # fmt: skip
    path = write_result("annotate", results, params, args.out)
    print(json.dumps(results, indent=1))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
