# Sourced by the bin/ commands: make .venv (once) and install the project into it.
# Idempotent: pip runs again only when pyproject.toml changed since the last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MAGVIT_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtual environment in $VENV" >&2
    "$PY" -m venv "$VENV"
fi
stamp="$VENV/.magvit-installed"
want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[setup] installing magvit-supervise and its dependencies (torch==2.13.0)" >&2
    "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
    "$VENV/bin/python" -m pip install --quiet -e "$ROOT[trainer,report,test]" >&2
    # Bytecode now, as a regular install would: every start of the supervisor pays for it otherwise.
    "$VENV/bin/python" -m compileall -q "$ROOT/supervisor" "$ROOT/trainer" >/dev/null
    echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
