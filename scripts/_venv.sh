# Sourced by scripts/test and scripts/demo: create or refresh ./.venv so that a fresh clone
# on a fresh machine needs nothing but a Python 3.10+ interpreter.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${WARPMESH_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
stamp_source() { cat "$ROOT/pyproject.toml" "$ROOT/scripts/_venv.sh" | sha256sum | cut -d' ' -f1; }
if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating virtualenv $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$VENV/.warpmesh-stamp" 2>/dev/null || true)" != "$(stamp_source)" ]; then
  echo "==> installing django-warpmesh and its test tools into $VENV" >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[test,dev]"
  stamp_source > "$VENV/.warpmesh-stamp"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
