#!/usr/bin/env bash
# Set up (first run only) and run the qwenkit CLI: scripts/run.sh ARGS...
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
exec "$root/.venv/bin/qwenkit" "$@"
