#!/usr/bin/env bash
# The main job on the embedded default model: several prompts for several users in one batch.
# Extra arguments go to `premier demo` (see `premier demo --help`).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
exec premier demo --out "${PREMIER_DEMO_OUT:-premier-demo}" "$@"
