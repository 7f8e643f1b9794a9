#!/usr/bin/env bash
# The README's test command on a fresh machine: set up .venv, then run the whole test suite on CPU.
# Extra arguments go to pytest, e.g. bash launch/test.sh -k data, or bash launch/test.sh -m "not slow" for the fast
# tier (no tests marked slow: long training runs and multi-process runs)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source launch/setup.sh
# DeepSpeed JIT-builds a C++ op the first time a run uses one (none of the CPU paths does); keep any build
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
set +e
# two test processes (TEST_WORKERS; 0 runs the tests in this one), each test's torch on one thread (tests/conftest.py);
# the tests on the two-node cluster share one process (their xdist group)
python -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadgroup --durations=20 "$@"  # the slowest: the suite's CI budget
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
exit $rc
