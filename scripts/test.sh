#!/usr/bin/env bash
# Set everything up (idempotent), lint, and run the tests on every supported LLaMA-Factory version:
#   0. `ruff check` and `ruff format --check` (LLaMA-Factory's rules, see pyproject.toml);
#   1. the full suite on .venv (LLaMA-Factory 0.9.5, the default stack);
#   2. the compatibility subset (tests marked `compat`) on .venv-lf-main (main at ff6d4d12e) and .venv-lf-0.9.4.
# Both run on the two cores with pytest-xdist; PYTEST_WORKERS=0 runs them in one process. Extra arguments go to
# pytest (every run). COMPAT_VERSIONS="" skips step 2. Measured times are in the README.
set -euo pipefail
cd "$(dirname "$0")/.."
COMPAT_VERSIONS="${COMPAT_VERSIONS-main 0.9.4}"

bash scripts/setup.sh
for version in $COMPAT_VERSIONS; do
  LLAMAFACTORY_VERSION="$version" bash scripts/setup.sh
done

# the web UI test drives Debian's Chromium (headless) through Playwright
if ! command -v chromium >/dev/null 2>&1; then
  echo "[setup] installing Debian's chromium for the web UI test"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi

# DeepSpeed on the CPU JIT-builds its shared-memory collectives op at its first distributed start (about 30 s, and
# 90 s inside a busy test run). Each environment gets its own build directory, built now with DeepSpeed's own builder
# and the PATH its tests run with: torch rebuilds the op whenever the include paths (another environment's DeepSpeed)
# or the ninja binary (the system's or the environment's own) differ from the last build in that directory.
in_venv() {  # in_venv VENV COMMAND...: COMMAND with the PATH and the op build directory of VENV's runs
  local venv="$1"; shift
  env PATH="$PWD/$venv/bin:$PATH" TORCH_EXTENSIONS_DIR="$PWD/$venv/torch_extensions" "$@"
}
venvs=(.venv)
for version in $COMPAT_VERSIONS; do venvs+=(".venv-lf-$version"); done
for venv in "${venvs[@]}"; do
  echo "[setup] $venv: DeepSpeed's CPU shm op: $(in_venv "$venv" "$venv/bin/python" -c '
from deepspeed.comm.torch import build_shm_op
print("ready" if build_shm_op() is not None else "not available")' 2>/dev/null | tail -1)"
done

run_pytest() {  # run_pytest VENV [pytest args...]
  local venv="$1"; shift
  echo "[test] $venv: $("$venv/bin/python" -c 'import llamafactory; print("LLaMA-Factory", llamafactory.__version__)')"
  local workers="${PYTEST_WORKERS:-2}" parallel=() threads=()
  # one torch thread per worker, as every CLI run the tests start has (conftest.cli_env): two workers of two
  # threads each on two cores ran the in-process tests 1.45x slower; loadgroup runs the torchrun tests on one
  # worker, one at a time (conftest.TORCHRUN)
  if [ "$workers" != 0 ]; then parallel=(--dist loadgroup); threads=("OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}"); fi
  in_venv "$venv" env HF_HUB_OFFLINE=1 "${threads[@]}" "$venv/bin/python" -m pytest -n "$workers" \
    "${parallel[@]}" "$@"
}

status=0  # every step runs even when an earlier one fails; the exit status is the first failure's
echo "[lint] ruff $(.venv/bin/ruff --version | cut -d' ' -f2)"
{ .venv/bin/ruff check . && .venv/bin/ruff format --check .; } || status=$?
run_pytest .venv "$@" || { rc=$?; [ "$status" != 0 ] || status=$rc; }
for version in $COMPAT_VERSIONS; do
  run_pytest ".venv-lf-$version" -m compat "$@" || { rc=$?; [ "$status" != 0 ] || status=$rc; }
done
exit "$status"
