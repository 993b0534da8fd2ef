#!/usr/bin/env bash
# Idempotent set-up: a .venv at the repo root with the pinned stack, then this package installed into it.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again (dependencies are re-installed only when
# requirements/ or setup.py change).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3.11}"

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $PYTHON"
  "$PYTHON" -m venv .venv
fi

stamp=".venv/.deps-$(cat requirements/*.txt setup.py | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing pinned dependencies (first run: about 3 minutes, 6 GB)"
  .venv/bin/python -m pip install -q --upgrade "pip==26.3"
  .venv/bin/python -m pip install -q -c requirements/constraints.txt -r requirements/base.txt -r requirements/test.txt
  rm -f .venv/.deps-*
  touch "$stamp"
fi

# Always reinstall the package itself (no deps, seconds): the .pth auto-registration must match the checkout.
.venv/bin/python -m pip install -q --no-deps --no-build-isolation --force-reinstall . >/dev/null
rm -rf build ./*.egg-info
echo "[setup] ready: $(.venv/bin/python -c 'import llamafactory, llamafactory_minorsft as m; print("llamafactory", llamafactory.__version__, "| llamafactory-minorsft", m.__version__)')"
