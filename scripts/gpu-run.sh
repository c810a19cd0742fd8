#!/usr/bin/env bash
# The whole GPU story in one command, on a fresh GPU host with no network:
#
#   scripts/gpu-run.sh OUT_DIR [--smoke|--full] [--budget-s S] [--wheels DIR] [--dry-run] [-- SUITE-ARGS]
#
# 1. installs the wheels that scripts/gpu-wheels.sh downloaded (default .gpu-wheels/) with
#    `pip install --no-index --no-deps --target` into a temporary folder: the "always" ones
#    whatever the host has, the "fill-in" ones only where the host's Python lacks the package;
#    a wheel that is not there gives one line and the run goes on with what the host has;
# 2. puts that folder and the repository on PYTHONPATH (the project itself is not installed);
# 3. runs `python -u -m benchmarks.gpu_suite --out-dir OUT_DIR` (preflight, kernel timings,
#    FLUX.1-dev-sized steps under a time budget: see its docstring), its output also in
#    OUT_DIR/run.log. The JSON and Markdown under OUT_DIR are rewritten after every measurement.
#
# --smoke: the preflight and one row of each measurement on a tiny model (< 90 s on a GPU); on a
# host without a GPU the kernels then run in Triton's interpreter (TRITON_INTERPRET=1).
# --full (default): everything, within --budget-s seconds of measurement (default 360).
# --dry-run: print what would be installed and run, and stop.
# Environment: PYTHON (default python3), PREMIER_GPU_WHEELS (the wheel folder).
# Exit status: the suite's (0 complete, 1 preflight failed), 2 for bad arguments.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
usage() {
  echo "usage: scripts/gpu-run.sh OUT_DIR [--smoke|--full] [--budget-s S] [--wheels DIR] [--dry-run] [-- SUITE-ARGS]" >&2
  exit 2
}

OUT_DIR=""
MODE=""
BUDGET=""
WHEELS="${PREMIER_GPU_WHEELS:-$ROOT/.gpu-wheels}"
DRY=0
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke | --full)
      [ -z "$MODE" ] || [ "$MODE" = "${1#--}" ] || { echo "gpu-run: --smoke and --full exclude each other" >&2; usage; }
      MODE="${1#--}"; shift ;;
    --budget-s)
      [ $# -ge 2 ] || { echo "gpu-run: --budget-s needs a number of seconds" >&2; usage; }
      BUDGET="$2"; shift 2 ;;
    --budget-s=*) BUDGET="${1#--budget-s=}"; shift ;;
    --wheels)
      [ $# -ge 2 ] || { echo "gpu-run: --wheels needs a folder" >&2; usage; }
      WHEELS="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h | --help) sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    -*) echo "gpu-run: unknown option $1" >&2; usage ;;
    *)
      [ -z "$OUT_DIR" ] || { echo "gpu-run: one OUT_DIR only (got $OUT_DIR and $1)" >&2; usage; }
      OUT_DIR="$1"; shift ;;
  esac
done
[ -n "$OUT_DIR" ] || { echo "gpu-run: OUT_DIR is required" >&2; usage; }
MODE="${MODE:-full}"
if [ -n "$BUDGET" ] && ! [[ "$BUDGET" =~ ^[0-9]+([.][0-9]+)?$ && "$BUDGET" != 0 ]]; then
  echo "gpu-run: --budget-s $BUDGET: expected a positive number of seconds" >&2
  usage
fi
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null 2>&1 || { echo "gpu-run: no Python at '$PY' (set PYTHON)" >&2; exit 2; }

# --- 1. the wheels: which to install, which are missing -----------------------------------
norm() { local s="${1,,}"; s="${s//-/_}"; echo "${s//./_}"; }
pins="$("$ROOT/scripts/gpu-wheels.sh" --list)" || { echo "gpu-run: cannot read the pin list" >&2; exit 2; }
names=()
while read -r name _; do names+=("$name"); done <<< "$pins"
# The host's Python, before anything is added: which pinned distributions it lacks.
absent=" $("$PY" - "${names[@]}" <<'EOF'
import importlib.metadata as md
import sys

for name in sys.argv[1:]:
    try:
        md.version(name)
    except md.PackageNotFoundError:
        print(name, end=" ")
EOF
) "
install=()
missing=()
while read -r name version role; do
  if [ "$role" = fill-in ] && [[ "$absent" != *" $name "* ]]; then
    continue  # the host has it: its copy goes with the rest of its packages
  fi
  found=""
  for whl in "$WHEELS"/*.whl; do
    [ -e "$whl" ] || continue
    IFS=- read -r wname wversion _ <<< "$(basename "$whl")"
    if [ "$(norm "$wname")" = "$(norm "$name")" ] && [ "$wversion" = "$version" ]; then found="$whl"; break; fi
  done
  if [ -n "$found" ]; then
    install+=("$found")
  else
    missing+=("$name==$version")
    host="the host has none"
    [[ "$absent" == *" $name "* ]] || host="the host's own copy is used"
    echo "gpu-run: missing wheel $name==$version in $WHEELS ($host; run scripts/gpu-wheels.sh where there is a package index)"
  fi
done <<< "$pins"

SITE=""
if [ "$DRY" = 1 ]; then
  for whl in "${install[@]}"; do echo "would install $(basename "$whl")"; done
  [ ${#install[@]} -eq 0 ] || SITE="<temporary folder>"
elif [ ${#install[@]} -gt 0 ]; then
  SITE="$(mktemp -d "${TMPDIR:-/tmp}/premier-gpu-site.XXXXXX")"
  trap 'rm -rf "$SITE"' EXIT
  if "$PY" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
    --target "$SITE" "${install[@]}"; then
    echo "gpu-run: installed ${#install[@]} wheels into $SITE"
  else
    echo "gpu-run: pip could not install the wheels into $SITE; going on with what the host has"
  fi
fi

# --- 2. the environment ----------------------------------------------------------------------
export PYTHONPATH="${SITE:+$SITE:}$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DIFFUSERS_VERBOSITY=error
export PREMIER_GPU_MISSING_WHEELS="$(IFS=,; echo "${missing[*]}")"
if [ "$MODE" = smoke ] && [ -z "${TRITON_INTERPRET:-}" ] \
  && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  export TRITON_INTERPRET=1  # no GPU: the fused kernels run in Triton's interpreter (slow; tiny shapes)
  echo "gpu-run: no CUDA GPU: the smoke run measures on the CPU, kernels in Triton's interpreter"
fi

# --- 3. the suite ----------------------------------------------------------------------------
cmd=("$PY" -u -m benchmarks.gpu_suite "--$MODE" --out-dir "$OUT_DIR" ${BUDGET:+--budget-s "$BUDGET"} "${EXTRA[@]}")
if [ "$DRY" = 1 ]; then
  echo "would run: PYTHONPATH=$PYTHONPATH ${cmd[*]}"
  exit 0
fi
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
cmd=("$PY" -u -m benchmarks.gpu_suite "--$MODE" --out-dir "$OUT_DIR" ${BUDGET:+--budget-s "$BUDGET"} "${EXTRA[@]}")
cd "$ROOT"
"${cmd[@]}" 2>&1 | tee "$OUT_DIR/run.log"
exit "${PIPESTATUS[0]}"
