"""Run every benchmark: `python -m bench.run --cpu` (make bench) sizes them for a 2-core CPU machine.

Each benchmark writes bench/results/<name>-<device>.json; on a GPU machine leave out --cpu.
"""

from __future__ import annotations

import argparse
import importlib
import time

BENCHMARKS = ("embed", "mine", "annotate")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    p.add_argument("--cpu", action="store_true", help="CPU-sized runs (about 5 minutes in all on 2 cores)")
    p.add_argument("--only", nargs="*", choices=BENCHMARKS, default=list(BENCHMARKS))
    args = p.parse_args(argv)
    for name in args.only:
        t0 = time.perf_counter()
        path = importlib.import_module(f"bench.{name}").main(["--cpu"] if args.cpu else [])
        print(f"{name}: {path} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
