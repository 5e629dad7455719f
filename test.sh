#!/usr/bin/env bash
# Sets up the environment if needed, then runs the test suite. Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/scripts/env.sh"
cd "$JAXGEN_ROOT"
exec "$PY" -m pytest -q "$@"
