#!/usr/bin/env bash
# Create .venv (if needed) and install qwenkit with its test extras. Idempotent and quick when
# nothing changed. torch is pinned to 2.13.0 here (a local CPU wheel on our machines); the
# package itself only asks for a range that admits it. As root, also installs Debian's
# chromium + chromedriver for the web-page test when they are missing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
quiet() { grep -v "^WARNING: Location" || true; }
stamp=".venv/.qwenkit-installed"
want="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | quiet
  .venv/bin/python -m pip install -q "torch==${QWENKIT_TORCH_VERSION:-2.13.0}" 2>&1 | quiet
  .venv/bin/python -m pip install -q -e ".[test]" "torch==${QWENKIT_TORCH_VERSION:-2.13.0}" 2>&1 | quiet
  .venv/bin/python -c "import torch, qwenkit, transformers, fastapi, xgrammar, openai"
  echo "$want" > "$stamp"
fi
if [ "${QWENKIT_SKIP_BROWSER:-0}" != 1 ] && [ "$(id -u)" = 0 ] && ! command -v chromedriver >/dev/null 2>&1; then
  echo "installing Debian chromium + chromium-driver (web page test)..." >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 \
    || echo "warning: could not install chromium; the web page test will be skipped" >&2
fi
