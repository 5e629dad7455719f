# Sourced by run.sh and test.sh: creates (once) and activates a virtual environment for jaxgen.
#   PYTHON=...  interpreter to build it with (default: python3; e.g. PYTHON=python3.12 PYENV_VERSION=3.12.1)
#   VENV=...    where to put it (default: .venv-<python version> in the repository)
set -euo pipefail
JAXGEN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
if ! command -v "$PYTHON" >/dev/null 2>&1 || ! "$PYTHON" -c 'import sys' >/dev/null 2>&1; then
  echo "error: cannot run '$PYTHON'. Set PYTHON to a Python 3.11-3.13 interpreter (with pyenv: PYENV_VERSION=3.12.1 PYTHON=python3.12)." >&2
  exit 2
fi
PYVER="$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
case "$PYVER" in
  3.11|3.12|3.13) ;;
  *) echo "error: jaxgen needs Python 3.11-3.13, '$PYTHON' is $PYVER." >&2; exit 2 ;;
esac
VENV="${VENV:-$JAXGEN_ROOT/.venv-$PYVER}"
STAMP="$VENV/.jaxgen-installed"
WANT="$(cat "$JAXGEN_ROOT/pyproject.toml" | cksum)"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[jaxgen] creating virtual environment $VENV (Python $PYVER)" >&2
  "$PYTHON" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[jaxgen] installing jaxgen and its dependencies into $VENV (first run: about a minute)" >&2
  LOG="$VENV/pip-install.log"
  if ! { "$VENV/bin/python" -m pip install -q --upgrade pip && "$VENV/bin/python" -m pip install -q -e "$JAXGEN_ROOT[test]"; } >"$LOG" 2>&1 \
     || ! "$VENV/bin/python" -c "import jaxgen, flax, optax, diffrax, orbax.checkpoint, pytest, xdist" >>"$LOG" 2>&1; then
    grep -v "is ignored" "$LOG" | tail -n 30 >&2
    echo "error: installing jaxgen into $VENV failed (full log: $LOG). Check that PyPI is reachable, or delete $VENV and retry." >&2
    exit 1
  fi
  echo "$WANT" > "$STAMP"
fi
PY="$VENV/bin/python"
export PYTHONDONTWRITEBYTECODE=1
