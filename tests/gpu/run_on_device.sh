#!/usr/bin/env bash
# The GPU checks: tests/gpu (4 workers on one GPU), then the benchmark's `stages` and `head-long` suites with
# --device cuda. Run from the repository root of the device machine, after the install prefix of the device kit
# (../shared/device/README.md: its wheels in .whl/, installed with `pip --target /tmp/site`), e.g.
#   ... && export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH HF_HUB_OFFLINE=1 && bash tests/gpu/run_on_device.sh
# Logs go to $OUT (at most 6 files). About 8 minutes. Knobs: RUN_TESTS=0, PYTEST_ARGS, TESTS_TIMEOUT, SUITES,
# BENCH_TIMEOUT, BENCH_STEPS.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-$PWD/device-logs}; mkdir -p "$OUT"
t0=$(date +%s)
say() { echo "[gpu_run +$(($(date +%s) - t0))s] $*" | tee -a "$OUT/gpu_run.log"; }
python3 - <<'PY' 2>&1 | tee "$OUT/preflight.log"
import importlib.metadata as md, torch
for name in ("torch", "transformers", "accelerate", "peft", "llamafactory", "llamafactory-minorsft", "deepspeed", "liger-kernel", "triton"):
    try:
        print(f"  {name:22} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name:22} MISSING")
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(), torch.cuda.device_count())
import llamafactory, llamafactory_minorsft  # noqa
from llamafactory.hparams import parser
from llamafactory_minorsft.hparams import PluginFinetuningArguments
assert PluginFinetuningArguments in parser._TRAIN_ARGS, "stages not registered"
print("registered")
PY
[ "${PIPESTATUS[0]}" = 0 ] || { say "preflight FAILED"; exit 2; }
if [ "${RUN_TESTS:-1}" = 1 ]; then
  say "pytest tests/gpu"
  timeout -k 10 "${TESTS_TIMEOUT:-330}" python3 -m pytest tests/gpu -q -rA -p lf_device_pytest -p no:cacheprovider \
    --timeout=200 --basetemp=/tmp/lf_pytest_gpu ${PYTEST_ARGS:--n 4} > "$OUT/pytest_gpu.log" 2>&1
  say "pytest rc=$?"
  grep -E "^(PASSED|FAILED|SKIPPED|ERROR)|passed|failed|peak CUDA" "$OUT/pytest_gpu.log" | tail -40
fi
for suite in ${SUITES:-stages head-long}; do
  say "bench $suite"
  rm -rf /tmp/lf_bench && mkdir -p /tmp/lf_bench
  TMPDIR=/tmp/lf_bench timeout -k 10 "${BENCH_TIMEOUT:-140}" python3 benchmarks/bench_reference.py --device cuda \
    --suite "$suite" --vocab-size 151936 --seq-len 1024 --batch-size 8 --steps "${BENCH_STEPS:-6}" --warmup 2 \
    --repeats 1 --output "$OUT/RESULTS.md" > "$OUT/bench_$suite.log" 2>&1
  say "bench $suite rc=$?"
  tail -n 14 "$OUT/bench_$suite.log"
done
say "done"
