#!/usr/bin/env bash
# Sets up .venv and runs the main job: LampQ on the embedded Fashion-MNIST ViT (offline).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[plot]'
.venv/bin/lampq demo --metric-check "$@"
