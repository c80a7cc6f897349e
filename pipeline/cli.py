"""The `megasynth` command line."""

from __future__ import annotations

import logging
import os
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional, Tuple

import typer
from rich.console import Console

from pipeline.rundir import STAGE_NAMES

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,  # plain help: flags read as flags (--json), not as options taking a <bool>
    help="Synthesise MegaPairs-style retrieval triplets: " + " -> ".join(STAGE_NAMES) + ".",
)
Executor = Enum("Executor", {name: name for name in ("ray", "local")}, type=str)  # shown as choices in --help
StageName = Enum("StageName", {name: name for name in STAGE_NAMES}, type=str)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"megasynth {version('megasynth')}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version and exit")) -> None:
    """Synthesise MegaPairs-style retrieval triplets: ingest -> embed -> search -> mine -> annotate -> write."""
console = Console(stderr=True)

# One line, non-zero exit, for every error a user can fix; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, RuntimeError)


def _fail(message: str) -> None:
    from rich.markup import escape

    console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _executor_overrides(executor: str | None, ray_address: str | None) -> list[str]:
    """--executor and --ray-address as settings; an address means the Ray executor unless told otherwise."""
    kind = executor.value if isinstance(executor, Enum) else executor
    out = [f"executor.kind={kind or 'ray'}"] if kind or ray_address else []
    return out + ([f"executor.ray_address={ray_address}"] if ray_address else [])


@app.command("make-corpus", epilog="\b\nExample:\n  megasynth make-corpus --out data/corpus --images 2000 --seed 0")
def make_corpus(
    out: Path = typer.Option(..., "--out", help="folder for the tar shards"),
    images: int = typer.Option(2000, "--images", min=1, help="how many images"),
    seed: int = typer.Option(0, "--seed", help="same seed, same bytes"),
    shard_size: int = typer.Option(256, "--shard-size", min=1, help="images per tar shard"),
) -> None:
    """Generate a Recap-DataComp-style corpus (img2dataset WebDataset layout) of rendered scenes with known shared attributes."""
    from demo.corpus import make_corpus as generate

    summary = generate(out, images, seed=seed, shard_size=shard_size, progress=True)
    console.print(f"corpus: {summary['images']} images in {summary['shards']} shards under {out}")


ResizeMode = Enum("ResizeMode", {m: m for m in ("keep_ratio", "keep_ratio_largest", "center_crop", "border", "no")}, type=str)


@app.command(epilog="\b\nExamples:\n  megasynth fetch 'recap/data/train_data/train-0000{0..9}-of-03550.parquet' --out /data/recap-shards\n"
             "  megasynth fetch urls.parquet --out shards --caption-col caption --re-caption-col recaption --keep uid\n"
             "  megasynth run configs/megapairs.yaml --corpus '/data/recap-shards/*.tar'")  # fmt: skip
def fetch(
    urls: List[str] = typer.Argument(..., metavar="URLS...", help="parquet URL tables, globs or {a..b} braces (Recap-DataComp-1B's data/train_data/*.parquet)"),
    out: Path = typer.Option(..., "--out", metavar="DIR", help="folder for the tar shards; rerun into it to resume"),
    url_col: str = typer.Option("url", "--url-col", metavar="COL", help="the URL column"),
    caption_col: str = typer.Option("org_caption", "--caption-col", metavar="COL", help="the original caption: `caption` in each sample's json and its .txt"),
    re_caption_col: str = typer.Option("re_caption", "--re-caption-col", metavar="COL", help="the re-caption: `re_caption` in each sample's json ('' if none)"),
    keep: Optional[List[str]] = typer.Option(None, "--keep", metavar="COL", help="a further column kept in the json (repeatable; default: every other column; key/sha256 become source_key/source_sha256)"),
    verify_hash: Optional[str] = typer.Option(None, "--verify-hash", metavar="COL", help="a column of sha256 hex digests: an image whose bytes differ fails as hash_mismatch"),
    image_size: int = typer.Option(512, "--image-size", min=1, metavar="PX", help="target side in pixels (see --resize-mode)"),
    resize_mode: ResizeMode = typer.Option("keep_ratio", "--resize-mode", help="img2dataset's: keep_ratio scales the short side to --image-size"),
    upscale: bool = typer.Option(False, "--upscale", help="also enlarge smaller images (default: only shrink)"),
    shard_size: int = typer.Option(10_000, "--shard-size", min=1, metavar="N", help="URLs per shard"),
    processes: Optional[int] = typer.Option(None, "--processes", min=1, metavar="N", help="download processes (default: the CPU count)"),
    threads: int = typer.Option(64, "--threads", min=1, metavar="N", help="download threads per process"),
    timeout: int = typer.Option(10, "--timeout", min=1, metavar="S", help="seconds before a URL fails as timeout"),
    retries: int = typer.Option(0, "--retries", min=0, metavar="N", help="further tries of a URL that failed to download"),
    json_: bool = typer.Option(False, "--json", help="machine-readable summary"),
) -> None:
    """Download Recap-DataComp-style URL tables into the WebDataset shards `megasynth run` reads, with img2dataset;
    print URLs in, images written and failures by reason."""
    import json

    from pipeline import fetch as fetching

    try:
        s = fetching.fetch(urls, out, url_col=url_col, caption_col=caption_col or None, re_caption_col=re_caption_col or None,
                           keep=keep or None, verify_hash=verify_hash, image_size=image_size, resize_mode=resize_mode.value,
                           upscale=upscale, shard_size=shard_size, processes=processes, threads=threads, timeout=timeout,
                           retries=retries)  # fmt: skip
    except USER_ERRORS as e:
        _fail(str(e))
    if json_:
        typer.echo(json.dumps(s.to_dict(), indent=1))
    else:
        Console().print(fetching.summary_table(s))
    if s.written == 0:
        _fail(f"no image was downloaded from {s.urls} URLs (reasons above); nothing for `megasynth run` to read")
    if s.not_done:
        console.print(f"[yellow]{s.not_done} URLs in {s.shards - s.shards_done} shards not finished:[/yellow] rerun the same command to retry them")
        raise typer.Exit(1)
    console.print(f"[green]{s.written} images[/green] in {s.shards} shards: megasynth run CONFIG --corpus '{out}/*.tar'")


@app.command(epilog="\b\nExamples:\n  megasynth run configs/demo.yaml --out runs/demo\n  megasynth run configs/megapairs.yaml --corpus 'recap/{00000..01999}.tar' --ray-address auto --out /shared/run\n  megasynth run configs/demo.yaml --out runs/no-hn --set mine.hard_negatives=0 --reuse runs/demo")
def run(
    config: Path = typer.Argument(..., metavar="CONFIG", help="YAML config, e.g. configs/demo.yaml"),
    corpus: Optional[List[str]] = typer.Option(None, "--corpus", help="corpus paths or globs (repeatable); overrides corpus.paths"),
    out: Optional[Path] = typer.Option(None, "--out", help="run folder (default: runs/<config name>)"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="override a setting, e.g. --set mine.k=32 (repeatable)"),
    executor: Optional[Executor] = typer.Option(None, "--executor", help="ray (default) or local (in-process, for debugging)"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="connect to an existing Ray cluster"),
    stage: Optional[StageName] = typer.Option(None, "--stage", help="run only this stage (its upstream must be done)"),
    reuse: Optional[List[Path]] = typer.Option(None, "--reuse", help="a finished run folder whose matching stages are used as they are (repeatable)"),
    replace: bool = typer.Option(False, "--replace", help="allow replacing finished stages of --out made with other settings"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
) -> None:
    """Run the pipeline (or one stage), resuming from whatever is already done in the run folder."""
    from pipeline import report, runner
    from pipeline.config import load_config

    overrides = [*(set_ or []), *_executor_overrides(executor, ray_address)]
    out = out or Path("runs") / config.stem
    try:
        cfg = load_config(config, overrides, corpus)
        summary = runner.run(cfg, out, only=stage.value if stage else None, progress=not quiet, reuse=reuse or (), replace=replace)
    except USER_ERRORS as e:
        _fail(str(e))
    st = {"stages": summary}
    console.print(report.status_table(st))
    if summary["write"]["done"]:
        n = report.triplet_count(out)
        t = out / "triplets"
        console.print(f"[green]{n} triplets[/green] in {t} (index: {t / 'index.jsonl'}, card: {t / 'README.md'})")


@app.command(epilog="\b\nExamples:\n  megasynth sweep configs/ablations/demo.yaml\n  megasynth sweep configs/ablations/demo.yaml --only caption --only scale-25")
def sweep(
    sweep_file: Path = typer.Argument(..., metavar="SWEEP", help="a sweep file: base config plus variants, e.g. configs/ablations/demo.yaml"),
    corpus: Optional[List[str]] = typer.Option(None, "--corpus", help="corpus paths or globs for every variant (repeatable)"),
    out: Optional[Path] = typer.Option(None, "--out", help="the sweep folder (default: the file's `out`, else runs/<sweep name>)"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="override a setting of every variant (repeatable)"),
    only: Optional[List[str]] = typer.Option(None, "--only", help="run only this variant (repeatable)"),
    executor: Optional[Executor] = typer.Option(None, "--executor", help="ray (default) or local"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="connect to an existing Ray cluster"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
) -> None:
    """Run a base config and its variants, each in its own folder, reusing every stage another variant finished."""
    from pipeline import report
    from pipeline.sweep import load_sweep, run_sweep

    overrides = [*(set_ or []), *_executor_overrides(executor, ray_address)]
    try:
        sw = load_sweep(sweep_file, overrides, corpus, out)
        summaries = run_sweep(sw, progress=not quiet, only=only, log=console.print)
    except USER_ERRORS as e:
        _fail(str(e))
    for name, summary in summaries.items():
        reused = [s for s, st in summary.items() if st.get("source")]
        console.print(f"{name}: {report.triplet_count(sw.out / name)} triplets" + (f" (reused: {', '.join(reused)})" if reused else ""))


@app.command(epilog="\b\nExamples:\n  megasynth status runs/demo\n  megasynth status runs/demo --json")
def status(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="a run folder"),
    json_: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Per stage: done or not, units, counts and rejections by reason."""
    from pipeline import report

    if not (run_dir / "_state").is_dir():
        _fail(f"{run_dir} is not a megasynth run folder (no _state/)")
    st = report.status(run_dir)
    if json_:
        typer.echo(report.dumps(st))
    else:
        Console().print(report.status_table(st))


@app.command(epilog="\b\nExample:\n  megasynth sample runs/demo -n 20 --out sample.html")
def sample(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="a run folder whose write stage has run"),
    n: int = typer.Option(20, "-n", min=1, help="how many triplets"),
    seed: int = typer.Option(0, "--seed", help="which random triplets"),
    out: Optional[Path] = typer.Option(None, "--out", help="the HTML file (default: RUN_DIR/sample.html)"),
) -> None:
    """Random triplets as one HTML page: images side by side with the description and instructions."""
    from pipeline.sample import sample_page

    try:
        page = sample_page(run_dir, n, seed, out)
    except USER_ERRORS as e:
        _fail(str(e))
    console.print(f"{page}")


@app.command(epilog="\b\nExample:\n  megasynth plan configs/megapairs.yaml --images 20M --gpus 64")
def plan(
    config: Path = typer.Argument(..., metavar="CONFIG", help="the config to estimate"),
    images: str = typer.Option(..., "--images", help="corpus size: 20M, 500k, 2000000"),
    gpus: Optional[int] = typer.Option(None, "--gpus", min=0, help="cluster GPUs: shows the workers each stage keeps busy, and warns of idle ones"),
    cpus: Optional[int] = typer.Option(None, "--cpus", min=1, help="cluster CPUs (default with --gpus: 16 per GPU)"),
    device: Optional[str] = typer.Option(None, "--device", help="whose benchmark results to use, e.g. h200 (default: the config's)"),
    json_: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Units and workers per stage; GPU-hours, memory and storage, each traced to the measured figure it extrapolates."""
    from pipeline.plan import plan_command

    try:
        typer.echo(plan_command(config, images, device, as_json=json_, gpus=gpus, cpus=cpus))
    except USER_ERRORS as e:
        _fail(str(e))


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks; results go to bench/results/ as JSON.")
app.add_typer(bench_app, name="bench")


def _bench(name: str, args: list[str]) -> None:
    import importlib

    root = Path(__file__).resolve().parent.parent  # a checkout: bench/ sits beside pipeline/
    if not (root / "bench" / "__init__.py").is_file():
        _fail("the benchmarks live in the source tree's bench/ folder, which an installed package lacks: "
              "install from a checkout (pip install -e .) and run megasynth there")
    if str(root) not in sys.path:  # an editable install puts only pipeline/ and stages/ on the path
        sys.path.insert(0, str(root))
    try:
        module = importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError as e:
        _fail(f"megasynth bench {name} needs {e.name}, which does not import here")
    if Path(module.__file__).resolve().parent != root / "bench":
        _fail(f"{module.__file__} shadows the checkout's bench/ folder: another package is named bench")
    paths = module.main(args)  # argparse: its own options and --help, usage errors exit with code 2
    for path in paths if isinstance(paths, list) else [paths]:
        console.print(f"results: {path}")


# Every argument, --help included, goes to the benchmark's own parser.
BENCH_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


@bench_app.command("mine", context_settings=BENCH_ARGS)
def bench_mine(ctx: typer.Context) -> None:
    """kNN backends: queries/s, effective TFLOP/s, recall@k against exact, peak memory (`... mine --help`)."""
    _bench("mine", ctx.args)


@bench_app.command("embed", context_settings=BENCH_ARGS)
def bench_embed(ctx: typer.Context) -> None:
    """The embed stage against the raw model forward, per space, and decode images/s (`... embed --help`)."""
    _bench("embed", ctx.args)


@bench_app.command("annotate", context_settings=BENCH_ARGS)
def bench_annotate(ctx: typer.Context) -> None:
    """Annotation backends: pairs/s and tokens/s against plain generate (`... annotate --help`)."""
    _bench("annotate", ctx.args)


@bench_app.command("all", context_settings=BENCH_ARGS)
def bench_all(ctx: typer.Context) -> None:
    """embed, mine and annotate in turn; --cpu sizes them for a 2-core machine, as `make bench` does (`... all --help`)."""
    _bench("run", ctx.args)


@app.command("demo-models")
def demo_models(
    corpus: List[str] = typer.Option(..., "--corpus", help="the demo corpus shards (the small VLM/LLM train on their captions)"),
    out: Path = typer.Option(Path("assets/models"), "--out", help="folder for the model folders"),
    steps: Optional[int] = typer.Option(None, "--steps", help="training steps of the tiny VLM/LLM (default: theirs)"),
    real_text: bool = typer.Option(False, "--real-text", help="also SmolLM2-135M-Instruct, for configs/demo-real-text.yaml"),
) -> None:
    """Build the offline demo's models: real EfficientNet-Lite0, DINOv2-S and MiniLM weights; tiny trained VLM/LLM;
    with --real-text, SmolLM2 converted from its GGUF."""
    from demo.assets import build_demo_models

    try:
        paths = build_demo_models(corpus, out, steps=steps, log=console.print, real_text=real_text)
    except USER_ERRORS as e:
        _fail(str(e))
    for name, path in paths.items():
        console.print(f"{name}: {path}")


@app.command(epilog="\b\nExample:\n  megasynth probe runs/demo")
def probe(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="a run folder whose annotate stage has run"),
    steps: int = typer.Option(400, "--steps", min=1, help="training steps of the fusion head"),
    seed: int = typer.Option(0, "--seed", help="same seed, same numbers"),
    held_out: float = typer.Option(0.2, "--held-out", help="share of query images kept out of training"),
    image_space: Optional[List[str]] = typer.Option(None, "--image-space", help="image space standing for an image (repeatable; default: all)"),
    text_space: Optional[str] = typer.Option(None, "--text-space", help="the text space whose model embeds instructions"),
    ground_truth: int = typer.Option(1000, "--ground-truth", min=0, help="most ground-truth triplets (synthetic corpus); 0: none"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto"),
) -> None:
    """Train a small fusion head on the run's triplets (frozen embeddings) and report recall@1/5/10 in RUN/probe.json."""
    from pipeline.probe import RESULT_FILE, ProbeSettings
    from pipeline.probe import probe as run_probe

    try:
        settings = ProbeSettings(steps=steps, seed=seed, held_out=held_out, image_spaces=image_space or None,
                                 text_space=text_space, ground_truth=ground_truth, device=device)  # fmt: skip
        result = run_probe(run_dir, settings)
    except USER_ERRORS as e:
        _fail(str(e))
    for name in ("held_out", "ground_truth"):
        r = result[name]
        if r is not None:
            recalls = "  ".join(f"{k} {r[k]:.3f} (query only {r['query_only'][k]:.3f})" for k in ("recall@1", "recall@5", "recall@10"))
            console.print(f"{name}: {r['triplets']} triplets, {r['instructions']} instructions: {recalls}")
    console.print(f"{run_dir / RESULT_FILE}")


REFERENCE_HELP = "the space the reference band was set in (default: semantic, EVA-CLIP's image tower in the paper; else the first)"
BAND_HELP = "the reference band LO HI (default: the run's band in the reference space)"


@app.command(epilog="\b\nExample:\n  megasynth compare runs/ablations-demo/* --out report.html")
def compare(
    runs: List[Path] = typer.Argument(..., metavar="RUN_DIR...", help="run folders to put side by side"),
    out: Path = typer.Option(Path("compare.html"), "--out", help="the HTML file: self-contained, opens from disk"),
    reference: Optional[str] = typer.Option(None, "--reference", help=REFERENCE_HELP),
    band: Optional[Tuple[float, float]] = typer.Option(None, "--band", help=BAND_HELP),
    triplets: int = typer.Option(3, "--triplets", min=0, help="random triplets shown per run"),
) -> None:
    """Runs side by side on one HTML page: similarity and bands, pairs, rejections, instructions, compute, triplets."""
    from pipeline.compare import compare as write_page

    try:
        page = write_page(runs, out, reference, band, triplets)
    except USER_ERRORS as e:
        _fail(str(e))
    console.print(f"{page}")


@app.command(epilog="\b\nExample:\n  megasynth calibrate runs/demo --reference caption")
def calibrate(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="a run folder whose search stage is done"),
    reference: Optional[str] = typer.Option(None, "--reference", help=REFERENCE_HELP),
    band: Optional[Tuple[float, float]] = typer.Option(None, "--band", help=BAND_HELP),
    json_: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Per space: similarity percentiles of the neighbour lists, and the band that keeps the reference band's share."""
    import json

    from pipeline import calibrate as cal

    try:
        result = cal.calibration(run_dir, reference, band)
    except USER_ERRORS as e:
        _fail(str(e))
    if json_:
        typer.echo(json.dumps(result, indent=1))
        return
    Console().print(cal.calibration_table(result))
    typer.echo(f"Bands that keep the same share of neighbours as the reference, for a config:\n{cal.bands_yaml(result)}")


def main() -> None:
    logging.basicConfig(level=os.environ.get("MEGASYNTH_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app(prog_name="megasynth")


if __name__ == "__main__":
    sys.exit(main())
