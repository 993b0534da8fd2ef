#!/usr/bin/env bash
# Set everything up (idempotent) and run the full test suite on both cores (pytest-xdist; 84 tests in 7.5 to
# 8.5 minutes on 2 CPU cores, measured 2026-11-22). PYTEST_WORKERS=0 runs them in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the web UI test drives Debian's Chromium (headless) through Playwright
if ! command -v chromium >/dev/null 2>&1; then
  echo "[setup] installing Debian's chromium for the web UI test"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1
exec python -m pytest -n "${PYTEST_WORKERS:-2}" "$@"
