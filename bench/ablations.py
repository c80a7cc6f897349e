"""The paper's ablations on the demo corpus, measured: `python -m bench.ablations` (after `make demo-assets`).

Runs the sweep (`megasynth sweep configs/ablations/demo.yaml`: each variant in its own folder,
reusing what the others finished), then per variant the pair truth and instruction faithfulness
(`pipeline.quality.summary`) and `megasynth probe`, and writes
bench/results/ablations-<sweep>.json and the same numbers as a markdown table (…-<sweep>.md) for
the README. Nothing here is tuned per variant: every variant gets the probe's same settings.

    python -m bench.ablations                      # the whole sweep, then the numbers
    python -m bench.ablations --no-sweep           # numbers for variant folders that already ran
    python -m bench.ablations --only all-spaces --only caption
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path

from bench.common import RESULTS, device_info

DEFAULT_SWEEP = Path(__file__).resolve().parent.parent / "configs" / "ablations" / "demo.yaml"


def measure(run_dir: Path, settings) -> dict:
    """One variant's numbers: counts from its ledger, pair truth and faithfulness, the probe."""
    from pipeline import quality, report
    from pipeline.probe import probe
    from pipeline.rundir import Ledger

    ledger = Ledger(run_dir)
    t0 = time.perf_counter()
    stats = json.loads((run_dir / "stats.json").read_text()) if (run_dir / "stats.json").is_file() else {}
    counters = ledger.summary("annotate")["counters"] if not ledger.summary("annotate")["source"] else {}
    result = {
        "run": str(run_dir),
        # what the variant cost, from its own last run: wall time, stages taken from other variants, answers generated
        "wall_seconds": stats.get("wall_seconds"),
        "reused": sorted(s for s, st in (stats.get("stages") or {}).items() if st.get("source")),
        "answers_generated": {k: v for k, v in counters.items() if k.endswith((".generated", ".cached"))},
        "pairs": ledger.summary("mine")["output"],
        "annotated": ledger.summary("annotate")["output"],
        "triplets": report.triplet_count(run_dir),
        "quality": quality.summary(run_dir),
    }
    result["probe"] = probe(run_dir, settings)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def table(results: dict[str, dict]) -> str:
    """Markdown: one row per variant. Recall in %; "query only" is the same retrieval without the instruction."""
    head = ("| variant | pairs | triplets | true % | near-dup % | unrelated % | faithful % | kept step "
            "| held-out R@1 / R@5 / R@10 | (query only) | ground truth R@1 / R@5 / R@10 |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    recalls = lambda x: "–" if x is None else " / ".join(_pct(x[f"recall@{k}"]) for k in (1, 5, 10))  # noqa: E731
    for name, r in results.items():
        truth = (r["quality"] or {}).get("truth", {}).get("all", {})
        faithful = (r["quality"] or {}).get("faithfulness", {}).get("faithful")
        pr = r["probe"]
        ho, gt = pr["held_out"], pr["ground_truth"]
        lines.append(f"| {name} | {r['pairs']} | {r['triplets']} | {_pct(truth.get('true'))} | {_pct(truth.get('duplicate'))} "
                     f"| {_pct(truth.get('unrelated'))} | {_pct(faithful)} | {pr['train']['kept_step']} "
                     f"| {recalls(ho)} | {recalls(ho['query_only'])} | {recalls(gt)} |")  # fmt: skip
    first = next(iter(results.values()), None)
    if first and first["probe"]["ground_truth"]:
        lines += ["", f"Ground truth with the query image alone (the same for every variant): R@1 / R@5 / R@10 = "
                      f"{recalls(first['probe']['ground_truth']['query_only'])}. Kept step 0: the head did best as the "
                      "query image alone on its validation triplets, i.e. it learned nothing useful from the instructions."]  # fmt: skip
    lines += ["", "What each variant cost in the sweep (its own run; stages taken from variants run before it):", "",
              "| variant | wall s | stages reused | descriptions generated / from cache | instruction lists generated / from cache |",
              "|---|---|---|---|---|"]  # fmt: skip
    for name, r in results.items():
        g = r.get("answers_generated") or {}
        lines.append(f"| {name} | {r.get('wall_seconds')} | {', '.join(r.get('reused') or []) or '-'} "
                     f"| {g.get('describe.generated', 0)} / {g.get('describe.cached', 0)} | {g.get('instruct.generated', 0)} / {g.get('instruct.cached', 0)} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Path:
    from pipeline.probe import ProbeSettings
    from pipeline.sweep import load_sweep, run_sweep

    p = argparse.ArgumentParser(prog="python -m bench.ablations", description=__doc__.splitlines()[0])
    p.add_argument("--sweep", type=Path, default=DEFAULT_SWEEP, help="the sweep file (default: configs/ablations/demo.yaml)")
    p.add_argument("--out", type=Path, default=None, help="the sweep folder (default: the sweep file's `out`)")
    p.add_argument("--only", action="append", default=None, help="only this variant (repeatable)")
    p.add_argument("--no-sweep", action="store_true", help="do not run the sweep; measure the variant folders that exist")
    p.add_argument("--executor", default=None, help="ray (the config's default) or local")
    p.add_argument("--seed", type=int, default=0, help="the probe's seed")
    p.add_argument("--steps", type=int, default=ProbeSettings().steps, help="the probe's training steps")
    p.add_argument("--results", type=Path, default=RESULTS, help="folder for the JSON and markdown results")
    args = p.parse_args(argv)

    overrides = [f"executor.kind={args.executor}"] if args.executor else []
    sweep = load_sweep(args.sweep, overrides, out=args.out)
    chosen = [v for v in sweep.variants if not args.only or v.name in args.only]
    started = time.perf_counter()
    if not args.no_sweep:
        run_sweep(sweep, progress=False, only=args.only)
    sweep_s = time.perf_counter() - started
    settings = ProbeSettings(seed=args.seed, steps=args.steps)
    results = {}
    for v in chosen:
        if not (v.out / "_state").is_dir():
            raise SystemExit(f"{v.out}: variant {v.name} has not run; run without --no-sweep")
        results[v.name] = measure(v.out, settings)
        print(f"{v.name}: {json.dumps({k: results[v.name][k] for k in ('pairs', 'triplets')})}", flush=True)

    args.results.mkdir(parents=True, exist_ok=True)
    name = f"ablations-{args.sweep.stem}"
    payload = {
        "bench": "ablations",
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_info(),
        "params": {"sweep": str(args.sweep), "out": str(sweep.out), "probe": settings.model_dump(), "ran_sweep": not args.no_sweep},
        "sweep_seconds": round(sweep_s, 1),
        "results": results,
    }
    path = args.results / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1) + "\n")
    md = table(results)
    (args.results / f"{name}.md").write_text(md)
    print(md)
    return path


if __name__ == "__main__":
    main()
