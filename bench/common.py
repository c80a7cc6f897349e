"""What every benchmark shares: the machine it ran on, timing by medians, and where results go."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

RESULTS = Path(__file__).resolve().parent / "results"


def device_info() -> dict:
    """The machine a result was measured on; copied into every result file."""
    info = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    try:
        info["cpu_model"] = next(
            line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    except ImportError:
        pass
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        pass
    return info


def device_tag() -> str:
    info = device_info()
    return info.get("gpu", "cpu").lower().replace("nvidia ", "").replace(" ", "-")


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1, sync: Callable[[], None] | None = None) -> dict:
    """Median (and spread) of wall seconds over `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
        if sync:
            sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats}


def write_result(name: str, results: list[dict] | dict, params: dict | None = None, out_dir: Path | None = None) -> Path:
    """bench/results/{name}-{device}.json: the machine, the parameters, the measurements."""
    folder = out_dir or RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{device_tag()}.json"
    payload = {
        "bench": name,
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_info(),
        "params": params or {},
        "results": results,
    }
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path
