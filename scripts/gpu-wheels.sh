#!/usr/bin/env bash
# Download, on a machine with a package index, the wheels that the GPU run (scripts/gpu-run.sh)
# imports and a bare CUDA PyTorch host may lack, so that the run needs no network there.
#
#   scripts/gpu-wheels.sh [--python 3.12] [--dry-run] [DIR]   download into DIR (default .gpu-wheels,
#                                                              git-ignored) and print the total size
#   scripts/gpu-wheels.sh --list                               the pins, one "NAME VERSION ROLE" a line
#   scripts/gpu-wheels.sh --image                              what a standard CUDA PyTorch image has
#
# --python is the GPU host's Python (wheels are for CPython on manylinux x86-64); --dry-run prints
# the pip command and downloads nothing. Wheels in DIR that match no pin are removed (two versions
# of one package would stop the offline install). The folder travels with the working tree to the
# GPU host, so it must stay well under the 64 MiB that may travel: the script fails above 40 MiB.
#
# Roles: "always" is installed by gpu-run.sh whatever the host has (the versions the project tests
# with); "fill-in" only where the host lacks the package (a host's own copy is consistent with the
# rest of its packages; diffusers' requirements are lower bounds). The pins are diffusers and
# torchao and the closure of their requirements minus what a CUDA PyTorch image holds (torch,
# torchvision and what they require: --image). Versions: constraints/cpu.txt where it names the
# package, otherwise the version in the project's environment; tests/benchmarks/test_gpu_suite.py
# checks both and that the closure is complete.
set -euo pipefail

PINS="
diffusers 0.42.1 always
torchao 0.18.0 always
huggingface_hub 2.4.0 fill-in
safetensors 0.8.0 fill-in
requests 2.34.2 fill-in
tqdm 4.70.1 fill-in
PyYAML 6.0.4 fill-in
importlib_metadata 10.2.0 fill-in
zipp 4.1.2 fill-in
regex 2026.11.19 fill-in
packaging 26.4 fill-in
hf_xet 1.8.0 fill-in
httpx2 2.16.2 fill-in
httpcore2 2.16.2 fill-in
h11 0.16.0 fill-in
anyio 4.16.0 fill-in
idna 3.20 fill-in
certifi 2026.10.19.post1 fill-in
charset_normalizer 3.5.3 fill-in
urllib3 2.8.0 fill-in
click 8.5.1 fill-in
truststore 0.10.5 fill-in
lazy_importer 0.1.0 fill-in
"
IMAGE="torch torchvision triton numpy pillow filelock typing_extensions sympy mpmath networkx jinja2 markupsafe fsspec setuptools"
LIMIT_MIB=40

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
usage() {
  echo "usage: scripts/gpu-wheels.sh [--python X.Y] [--dry-run] [DIR] | --list | --image" >&2
  exit 2
}

PYVER=3.12
DRY=0
DIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --list) echo "$PINS" | sed '/^$/d'; exit 0 ;;
    --image) echo "$IMAGE" | tr ' ' '\n'; exit 0 ;;
    --python)
      [ $# -ge 2 ] || { echo "gpu-wheels: --python needs a version such as 3.12" >&2; usage; }
      PYVER="$2"; shift 2 ;;
    --python=*) PYVER="${1#--python=}"; shift ;;
    --dry-run) DRY=1; shift ;;
    -h | --help) sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "gpu-wheels: unknown option $1" >&2; usage ;;
    *)
      [ -z "$DIR" ] || { echo "gpu-wheels: one folder only (got $DIR and $1)" >&2; usage; }
      DIR="$1"; shift ;;
  esac
done
[[ "$PYVER" =~ ^3\.[0-9]+$ ]] || { echo "gpu-wheels: --python $PYVER: expected a version such as 3.12" >&2; usage; }
DIR="${DIR:-$ROOT/.gpu-wheels}"

specs=()
while read -r name version _role; do
  [ -n "$name" ] && specs+=("$name==$version")
done <<< "$PINS"

platforms=()
for n in 17 24 27 28 31 34 35 39; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
PIP=("${PIP_PYTHON:-python3}" -m pip)
cmd=("${PIP[@]}" download --quiet --disable-pip-version-check --no-deps --only-binary=:all:
  --python-version "$PYVER" --implementation cp "${platforms[@]}" -d "$DIR")

if [ "$DRY" = 1 ]; then
  echo "would run: ${cmd[*]} ${specs[*]}"
  echo "into $DIR: ${#specs[@]} wheels for CPython $PYVER on manylinux x86-64"
  exit 0
fi

mkdir -p "$DIR"
if ! "${cmd[@]}" "${specs[@]}"; then
  echo "gpu-wheels: pip could not download them all; trying one at a time to name the missing ones" >&2
  failed=()
  for spec in "${specs[@]}"; do
    "${cmd[@]}" "$spec" >/dev/null 2>&1 || failed+=("$spec")
  done
  if [ ${#failed[@]} -gt 0 ]; then
    echo "gpu-wheels: no wheel for CPython $PYVER on manylinux x86-64: ${failed[*]}" >&2
    exit 1
  fi
fi

norm() { local s="${1,,}"; s="${s//-/_}"; echo "${s//./_}"; }
# Keep exactly the pinned versions: a second version of a package stops the offline install.
wanted=" "
for spec in "${specs[@]}"; do wanted+="$(norm "${spec%%==*}")==${spec#*==} "; done
for whl in "$DIR"/*.whl; do
  [ -e "$whl" ] || continue
  base="$(basename "$whl")"
  IFS=- read -r wname wversion _ <<< "$base"
  if [[ "$wanted" != *" $(norm "$wname")==$wversion "* ]]; then
    echo "gpu-wheels: removing $base (not pinned)"
    rm -f "$whl"
  fi
done

count=$(find "$DIR" -maxdepth 1 -name '*.whl' | wc -l)
bytes=$(find "$DIR" -maxdepth 1 -name '*.whl' -printf '%s\n' | awk '{s += $1} END {print s + 0}')
mib=$(awk -v b="$bytes" 'BEGIN {printf "%.1f", b / 1048576}')
echo "gpu-wheels: $count wheels, $bytes bytes ($mib MiB) in $DIR"
if [ "$bytes" -gt $((LIMIT_MIB * 1048576)) ]; then
  echo "gpu-wheels: over $LIMIT_MIB MiB: too close to the 64 MiB that may travel to the GPU host" >&2
  exit 1
fi
