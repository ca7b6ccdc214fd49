#!/usr/bin/env bash
# The GPU check in one call: install the carried wheels if pyautoattack is missing, then bench/bench_gpu.py.
#
#   bash bench/gpu_check.sh                 # on the GPU machine (see bench/README.md for the run call)
#   bash bench/gpu_check.sh --smoke         # anywhere: tiny sizes on the CPU, skips the install when it can
#
# Arguments go to bench_gpu.py. Environment: PYTHON (default python3), GPU_CHECK_LIMIT_S (hard stop for the
# Python process, default 450 s; it gets SIGINT first and prints what it measured), OUT (log folder).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

if "$PY" -c "import pyautoattack" 2>/dev/null; then
    echo "# pyautoattack importable: no wheel install"
else
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "error: pyautoattack is not installed and .whl/ holds no wheels" >&2
        echo "  fix: prepare .whl/ as bench/README.md says and name .whl in the run call's carry list" >&2
        exit 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "error: installing the carried wheels failed" >&2; exit 2; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    echo "# installed $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')into /tmp/site"
fi
# The repo root makes `zoo` importable without installing the project; bench_gpu.py loads zoo.evaluate from
# ./evaluate when the package is not installed (pyproject maps evaluate/ to zoo.evaluate).
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD

if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,clocks.max.sm,temperature.gpu \
        --format=csv 2>/dev/null | sed 's/^/# /'
fi

LIMIT=${GPU_CHECK_LIMIT_S:-450}
timeout -s INT -k 20 "$LIMIT" "$PY" bench/bench_gpu.py "$@"
rc=$?
[ "$rc" -eq 124 ] && echo "# bench_gpu.py was stopped after ${LIMIT} s (GPU_CHECK_LIMIT_S)"
exit "$rc"
