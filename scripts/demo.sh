#!/usr/bin/env bash
# Set everything up (idempotent) and run the tiny CPU demo: SFT, MinorSFT and SFT using DPO.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1
exec llamafactory-minorsft demo --output-dir demo_output --examples-dir examples_yaml/tiny
