"""`megasynth sweep SWEEP.yaml`: a base config and its variants, each in its own folder, sharing work.

    base: ../megapairs.yaml          # the config every variant starts from (relative to this file)
    out: runs/ablations              # the sweep folder; default runs/<sweep file name>
    variants:                        # name -> what it changes (deep-merged onto the base)
      three-spaces: {}
      caption-only: {mine: {spaces: [caption]}}
    grid:                            # and/or: every combination of one choice per axis
      band: {paper: {}, wide: {mine: {band: [0.70, 0.98]}}}
      scale: {"100": {}, "25": {mine: {queries: 0.25}}}

A grid adds the variants `band-paper_scale-100`, `band-paper_scale-25`, ... Variants run in
order, each into `OUT/<name>` with every other variant's folder as `--reuse`: a stage one of
them has finished with the same settings is used from there, never run again, and answers
already written anywhere are not asked again. A rerun of the sweep resumes each variant.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.config import ConfigError, RunConfig, load_config, merge, resolve_files


@dataclass(frozen=True)
class Variant:
    name: str
    config: RunConfig
    out: Path


@dataclass(frozen=True)
class Sweep:
    path: Path
    base: Path
    out: Path
    variants: tuple[Variant, ...]


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


def load_sweep(path: str | Path, overrides: list[str] = (), corpus: list[str] | None = None, out: Path | None = None) -> Sweep:
    """Read a sweep file; every variant's config is validated before anything runs. Raises ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(spec, dict) or "base" not in spec:
        raise ConfigError(f"{path}: a sweep is a mapping with `base` (a config file) and `variants` and/or `grid`")
    if unknown := sorted(set(spec) - {"base", "out", "variants", "grid"}):
        raise ConfigError(f"{path}: unknown key(s) {unknown}; allowed: base, out, variants, grid")
    base = (path.parent / spec["base"]).resolve()
    patches = dict(_mapping(spec.get("variants") or {}, f"{path}: variants"))
    for name, patch in _grid(spec.get("grid") or {}, path):
        if name in patches:
            raise ConfigError(f"{path}: variant {name!r} is named twice")
        patches[name] = patch
    if not patches:
        raise ConfigError(f"{path}: no variants (give `variants` or `grid`)")
    root = Path(out or spec.get("out") or Path("runs") / path.stem).resolve()
    variants = []
    for name, patch in patches.items():
        if not NAME.fullmatch(name):
            raise ConfigError(f"{path}: variant name {name!r}: use letters, digits, '.', '+', '-' and '_' (it names a folder)")
        try:
            cfg = load_config(base, overrides, corpus, patch=resolve_files(patch, path.parent))  # its files: next to the sweep file
        except ConfigError as e:
            raise ConfigError(f"variant {name}: {e}") from None
        variants.append(Variant(name, cfg, root / name))
    return Sweep(path, base, root, tuple(variants))


def _mapping(value, what: str) -> dict:
    if not isinstance(value, dict) or not all(isinstance(v, dict) or v is None for v in value.values()):
        raise ConfigError(f"{what}: a mapping of name -> settings to change")
    return {str(k): v or {} for k, v in value.items()}


def _grid(grid: dict, path: Path) -> list[tuple[str, dict]]:
    axes = [(axis, _mapping(choices, f"{path}: grid.{axis}")) for axis, choices in _mapping(grid, f"{path}: grid").items()]
    if not axes:
        return []
    out = []
    for combo in itertools.product(*[[(axis, name, patch) for name, patch in choices.items()] for axis, choices in axes]):
        name = "_".join(f"{axis}-{choice}" for axis, choice, _ in combo)
        patch: dict = {}
        for _, _, p in combo:
            patch = merge(patch, p)
        out.append((name, patch))
    return out


def run_sweep(sweep: Sweep, progress: bool = True, only: list[str] | None = None, log=print) -> dict[str, dict]:
    """Run every variant in order (or those named in `only`), each reusing what the others finished."""
    from pipeline import runner

    chosen = [v for v in sweep.variants if not only or v.name in only]
    if only and (missing := sorted(set(only) - {v.name for v in sweep.variants})):
        raise ConfigError(f"no variant named {missing} in {sweep.path} (variants: {', '.join(v.name for v in sweep.variants)})")
    summaries = {}
    ray_owner = _start_ray(chosen)
    try:
        for v in chosen:
            others = [o.out for o in sweep.variants if o.out != v.out and (o.out / "_state").is_dir()]
            log(f"sweep {sweep.path.name}: variant {v.name} -> {v.out}")
            summaries[v.name] = runner.run(v.config, v.out, progress=progress, reuse=others)
    finally:
        if ray_owner:
            import ray

            ray.shutdown()
    return summaries


def _start_ray(variants: list[Variant]) -> bool:
    """One Ray session for the whole sweep, not one per variant (each start costs seconds)."""
    from pipeline.executors import start_ray

    ex = variants[0].config.executor if variants else None
    return ex is not None and ex.kind == "ray" and start_ray(ex.ray_address, ex.num_cpus, ex.num_gpus)
