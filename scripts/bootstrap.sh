#!/usr/bin/env bash
# Create .venv (if needed) and install qwenkit with its test extras. Idempotent and quick when
# nothing changed. torch is pinned to 2.13.0 here (a local CPU wheel on our machines); the
# package itself only asks for a range that admits it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=".venv/.qwenkit-installed"
want="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install -q "torch==${QWENKIT_TORCH_VERSION:-2.13.0}" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import torch, qwenkit, transformers" 
  echo "$want" > "$stamp"
fi
