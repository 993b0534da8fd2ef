#!/usr/bin/env bash
# Idempotent set-up: a virtual environment at the repo root with a pinned stack, then this package installed into
# it. Safe to run again: dependencies are re-installed only when requirements/ or setup.py change.
#
#   bash scripts/setup.sh                               # .venv: LLaMA-Factory 0.9.5 (the default stack)
#   LLAMAFACTORY_VERSION=main bash scripts/setup.sh     # .venv-lf-main: LLaMA-Factory main at commit ff6d4d12e
#   LLAMAFACTORY_VERSION=0.9.4 bash scripts/setup.sh    # .venv-lf-0.9.4: LLaMA-Factory 0.9.4
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3.11}"
VERSION="${LLAMAFACTORY_VERSION:-0.9.5}"
MAIN_ARCHIVE="$ROOT/../shared/llamafactory-src/llamafactory-main-ff6d4d12e.tar.gz"

# each version: its environment, its top-level requirements and its lock file (see requirements/README.md)
case "$VERSION" in
  0.9.5) VENV=.venv;           REQS=requirements/base.txt;     LOCK=requirements/constraints.txt ;;
  main)  VENV=.venv-lf-main;   REQS=requirements/lf-main.txt;  LOCK=requirements/constraints-lf-main.txt ;;
  0.9.4) VENV=.venv-lf-0.9.4;  REQS=requirements/lf-0.9.4.txt; LOCK=requirements/constraints-lf-0.9.4.txt ;;
  *)
    echo "[setup] error: LLAMAFACTORY_VERSION=$VERSION is not supported. Valid values: 0.9.5 (default, .venv)," \
      "main (.venv-lf-main, LLaMA-Factory main at commit ff6d4d12e), 0.9.4 (.venv-lf-0.9.4)." >&2
    exit 2 ;;
esac

SOURCES=()  # LLaMA-Factory main is built from the source archive beside this repo (the releases come from PyPI)
if [ "$VERSION" = main ]; then
  if [ ! -f "$MAIN_ARCHIVE" ]; then
    echo "[setup] error: LLAMAFACTORY_VERSION=main builds LLaMA-Factory from $MAIN_ARCHIVE, which is missing." >&2
    exit 2
  fi
  SOURCES=("$MAIN_ARCHIVE")
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.deps-$(cat "$REQS" "$LOCK" requirements/test.txt setup.py | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing the pinned LLaMA-Factory $VERSION stack into $VENV (first run: about 3 minutes, 6 GB)"
  "$VENV/bin/python" -m pip install -q --upgrade "pip==26.3"
  "$VENV/bin/python" -m pip install -q -c "$LOCK" -r "$REQS" -r requirements/test.txt "${SOURCES[@]}"
  rm -f "$VENV"/.deps-*
  touch "$stamp"
fi

# Always reinstall the package itself (no deps, seconds): the .pth auto-registration must match the checkout.
"$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation --force-reinstall . >/dev/null
rm -rf build ./*.egg-info
echo "[setup] ready in $VENV: $("$VENV/bin/python" -c 'import llamafactory, transformers, llamafactory_minorsft as m; print("llamafactory", llamafactory.__version__, "| transformers", transformers.__version__, "| llamafactory-minorsft", m.__version__)')"
