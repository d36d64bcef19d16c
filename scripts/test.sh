#!/usr/bin/env bash
# Set up (first run only) and run the whole test suite, real-model tests included.
# Extra arguments go to pytest (e.g. -m "not slow" for the fast unit tests only).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
exec .venv/bin/python -m pytest -q "$@"
