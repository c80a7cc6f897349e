"""Run every benchmark: `megasynth bench all --cpu` (or `python -m bench.run --cpu`, as make bench does) sizes
them for a 2-core CPU machine.

Each benchmark writes bench/results/<name>-<device>.json; on a GPU machine leave out --cpu.
"""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path

BENCHMARKS = ("embed", "mine", "annotate")


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(prog="megasynth bench all", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="CPU-sized runs (about 5 minutes in all on 2 cores)")
    p.add_argument("--only", nargs="*", choices=BENCHMARKS, default=list(BENCHMARKS))
    args = p.parse_args(argv)
    paths = []
    for name in args.only:
        t0 = time.perf_counter()
        paths.append(importlib.import_module(f"bench.{name}").main(["--cpu"] if args.cpu else []))
        print(f"{name}: {paths[-1]} ({time.perf_counter() - t0:.0f} s)")
    return paths


if __name__ == "__main__":
    main()
