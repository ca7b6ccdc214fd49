#!/usr/bin/env bash
# The GPU check in one call: install the carried wheels if pyautoattack is missing, run the CUDA-only tests
# (skipped everywhere else), then bench/bench_gpu.py (as `python -m bench.bench_gpu`) in the time that is left.
#
#   bash bench/gpu_check.sh                 # on the GPU machine (see bench/README.md for the run call)
#   bash bench/gpu_check.sh --smoke         # anywhere: tiny sizes on the CPU, skips the install when it can
#
# Arguments go to bench_gpu.py. Environment: PYTHON (default python3), GPU_CHECK_LIMIT_S (hard stop for the
# whole check, default 450 s; bench_gpu.py gets SIGINT first and prints what it measured), GPU_CHECK_TESTS
# (0 skips the CUDA tests), OUT (log folder).
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
TEST_LIMIT=$((LIMIT / 3 < 150 ? LIMIT / 3 : 150))
TESTS="not run"
TEST_RC=0
if [ "${GPU_CHECK_TESTS:-1}" != 0 ] && "$PY" -c "import torch, pytest, yaml; assert torch.cuda.is_available()" 2>/dev/null; then
    # The tests import zoo.evaluate as installed (evaluate/ -> zoo.evaluate): build this tree offline, afresh
    # (pip --target keeps what an earlier call on a still-warm machine left there).
    rm -rf /tmp/zoo-site
    if "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir \
            --target /tmp/zoo-site . >/tmp/zoo-install.log 2>&1; then
        echo "# CUDA-only tests (tests/test_eval_devices.py, tests/test_eval_bf16.py: bf16 initial mask; -k gpu)," \
            "at most ${TEST_LIMIT} s"
        # From /tmp: `python -m pytest` puts its working directory first on sys.path, and ./zoo lacks evaluate/.
        # --import-mode=importlib: the default would put the repo root (tests/ is a package) ahead of
        # /tmp/zoo-site; this way zoo comes from /tmp/zoo-site and `tests.support` from the checkout on PYTHONPATH.
        (cd /tmp && PYTHONPATH=/tmp/zoo-site:$PYTHONPATH timeout -s INT -k 10 "$TEST_LIMIT" "$PY" -m pytest -q \
            -p no:cacheprovider --import-mode=importlib "$OLDPWD/tests/test_eval_devices.py" \
            "$OLDPWD/tests/test_eval_bf16.py" -k gpu) 2>&1 | tee /tmp/gpu-tests.log | tail -n 30
        TEST_RC=${PIPESTATUS[0]}
        TESTS=$(grep -E " in [0-9.]+s" /tmp/gpu-tests.log | tail -n 1)
        TESTS=${TESTS:-"no pytest summary (stopped at ${TEST_LIMIT} s?): see gpu_tests.log"}
        [ -n "${OUT:-}" ] && cp /tmp/gpu-tests.log "$OUT/gpu_tests.log"
    else
        TEST_RC=2
        TESTS="not run: building the project failed ($(tail -n 1 /tmp/zoo-install.log))"
    fi
fi
LEFT=$((LIMIT - SECONDS))
if [ "$LEFT" -lt 60 ]; then
    echo "# CUDA tests: $TESTS"; echo "# no time left for bench_gpu.py"; exit 1
fi
# the bench's own budget (default 420 s, smoke 120 s, or --budget-s) is capped by the time left
timeout -s INT -k 20 "$LEFT" "$PY" -m bench.bench_gpu --budget-cap-s $((LEFT - 30)) "$@"
rc=$?
[ "$rc" -eq 124 ] && echo "# bench_gpu.py was stopped after ${LEFT} s (GPU_CHECK_LIMIT_S)"
echo "# CUDA tests: $TESTS"
# pytest: 0 all passed, 5 none collected (e.g. all deselected); anything else fails the check
[ "$rc" -eq 0 ] && [ "$TEST_RC" -ne 0 ] && [ "$TEST_RC" -ne 5 ] && rc=1
exit "$rc"
