#!/usr/bin/env bash
# The main job on the embedded default model: start the server, send requests for several users over
# HTTP and KServe v2 gRPC, write the images and a contact sheet, stop.
# Extra arguments go to `premier serve` (see `premier serve --help`).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
exec premier serve --demo "${PREMIER_DEMO_OUT:-premier-serve-demo}" "$@"
