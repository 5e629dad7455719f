#!/usr/bin/env bash
# Sets up the environment if needed, then runs the test suite. Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/scripts/env.sh"
cd "$JAXGEN_ROOT"
# Test files run in parallel, one per worker (pytest-xdist): at most 4 workers, one per CPU core; JAX compilation
# dominates and is single-threaded. Files go to the workers in collection order, the longest first
# (tests/conftest.py). JAXGEN_TEST_WORKERS=N chooses N (0: no workers, all in this process), and so does `-n N`
# among the arguments.
WORKERS="${JAXGEN_TEST_WORKERS:-$("$PY" -c 'import os; n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1; print(0 if n < 2 else min(n, 4))')}"
exec "$PY" -m pytest -q -n "$WORKERS" --dist loadfile --no-loadscope-reorder "$@"
