#!/usr/bin/env bash
# Set everything up (idempotent) and run the full test suite (about 5 minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1
exec python -m pytest "$@"
