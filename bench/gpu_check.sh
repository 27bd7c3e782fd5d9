#!/usr/bin/env bash
# The prepared GPU check of issue 19 (what it runs: bench/gpu_check.py). In one call on a GPU machine that has
# torch with CUDA but no internet, from the repository root, with .gpu-check/ carried along:
#
#   bash bench/gpu_check.sh prepare          # first, here (with internet): wheels and images into .gpu-check/
#   bash bench/gpu_check.sh                  # there: a few minutes on an H100/H200-class GPU (cut at 9 min 15 s)
#   bash bench/gpu_check.sh --cpu-dry-run    # the same steps on this CPU, tiny, to check the script
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
python="${PYTHON:-python3}"
if [ -x "$repo/.venv/bin/python" ] && [ "${1:-}" != "" ] && [ "$1" != "run" ]; then
    python="$repo/.venv/bin/python"  # here: prepare and the dry run use the project's environment
fi

if [ "${1:-}" = "prepare" ]; then
    PYTHONPATH="$repo" exec "$python" bench/gpu_check.py prepare "${@:2}"
fi

if [ ! -d .gpu-check/wheels ] || [ ! -f .gpu-check/cifar10-lt.tar.gz ]; then
    echo "error: .gpu-check/ is missing: run 'bash bench/gpu_check.sh prepare' where there is internet, then carry it" >&2
    exit 2
fi
site=/tmp/ride-gpu-check-site
if [ "${1:-}" != "--cpu-dry-run" ]; then
    # The GPU machine's image lacks these pure-Python packages (and their compiled cores): no index, no internet.
    "$python" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        .gpu-check/wheels/*.whl
fi
export PYTHONPATH="$site:$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
# 555 s, then an interrupt that still prints the summary (30 s allowed for it): one 10-minute call holds it all.
exec timeout --signal=INT --kill-after=30 555 "$python" bench/gpu_check.py run "$@"
