#!/usr/bin/env bash
# The GPU benchmarks in one go, each bounded so that all three end inside ten minutes:
#     bash bench/gpu.sh [RESULTS_DIR [BENCH_ARGS...]]      # default bench/results
# BENCH_ARGS go to every benchmark (`bash bench/gpu.sh /tmp/r --cpu` walks this script on a CPU).
# On a machine with no package index, run `make gpu-wheels` where there is one and bring .whl/
# along: where the benchmarks' imports are missing, its wheels are installed into /tmp/site
# (Python 3.12, x86-64).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results}
shift || true
mkdir -p "$out"
if ! python3 -c "import braceexpand, faiss, pydantic, webdataset" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
rc=0
for step in "embed 180" "mine 120 --no-scaling" "annotate 270"; do  # name, seconds at most, its own arguments
    read -r name limit own <<<"$step"
    echo "== bench $name (at most $limit s)"
    timeout "$limit" python3 -m "bench.$name" --out "$out" $own "$@" || { echo "bench $name failed or ran out of time"; rc=1; }
done
exit $rc
