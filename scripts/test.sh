#!/usr/bin/env bash
# Install, then run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
export HF_HUB_OFFLINE=1
.venv/bin/python -m ruff check handler scripts tests
.venv/bin/python -m pytest -q "$@"
