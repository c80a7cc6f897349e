"""Benchmarks: `python -m bench.run` (or `make bench`). Results are JSON files in bench/results/."""
