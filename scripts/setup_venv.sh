#!/usr/bin/env bash
# Create .venv at the repo root and install the project with its pinned requirements.
# torch goes first, pinned exactly: CI's pip configuration finds a local CPU wheel of this
# version, while any other spec would pull several GB of CUDA wheels from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -r docker/requirements.txt
.venv/bin/python -m pip install -q -e ".[dev]"
