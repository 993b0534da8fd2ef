#!/usr/bin/env bash
# Every table of benchmarks/RESULTS.md, one after another (about 70 minutes on a 2-core CPU). Run nothing else
# meanwhile: the step times are wall-clock times. Each command rewrites its own section of RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1
BENCH=(.venv/bin/python benchmarks/bench_reference.py)
VOCAB=(--vocab-size 151936 --steps 4 --warmup 1 --repeats 1)

"${BENCH[@]}" --steps 14 --warmup 2 --batch-size 8 --repeats 2             # the small-vocabulary table
"${BENCH[@]}" --suite stages --seq-len 1024 --batch-size 2 "${VOCAB[@]}"    # every stage, hidden 256 (issue 14)
for suite in head-short head-long; do                                         # Qwen2-1.5B's head (issue 19)
  "${BENCH[@]}" --suite "$suite" --precision fp32 "${VOCAB[@]}"
  "${BENCH[@]}" --suite "$suite" --precision bf16 "${VOCAB[@]}"
  "${BENCH[@]}" --suite "$suite" --precision bf16 --deepspeed z2 "${VOCAB[@]}"
done
"${BENCH[@]}" --suite zero3 "${VOCAB[@]}"                                    # ZeRO-3, 2 processes
