# Sourced by the other scripts: create (or refresh) the project's virtual environment.
# A stamp holding the hash of pyproject.toml and the constraints file decides when to reinstall.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PREMIER_VENV:-$ROOT/.venv}"
CONSTRAINTS="${PREMIER_CONSTRAINTS:-$ROOT/constraints/cpu.txt}"

pick_python() {
  for py in "${PYTHON:-}" python3.11 python3 python; do
    [ -n "$py" ] || continue
    if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
      echo "$py"; return 0
    fi
  done
  echo "error: Python 3.10+ (3.11 recommended) is required" >&2; return 1
}

want="$(cat "$ROOT/pyproject.toml" "$CONSTRAINTS" | sha256sum | cut -d' ' -f1)"
stamp="$VENV/.premier-install"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  PY="$(pick_python)"
  echo "setting up $VENV with $("$PY" --version) (one time, about a minute)..." >&2
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c "$CONSTRAINTS" -e "$ROOT[dev]" 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" >&2 || true
  "$VENV/bin/python" -c "import premier, torch, diffusers" || { echo "error: installation failed" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
export HF_HUB_OFFLINE=1
