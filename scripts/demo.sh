#!/usr/bin/env bash
# Install, write the demo volume, and run one real job through the RunPod handler path.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
export HF_HUB_OFFLINE=1
[ -f demo-volume/checkpoints/demo-sd15.safetensors ] || .venv/bin/python scripts/make_demo_volume.py demo-volume >/dev/null
MODELS_DIR="$PWD/demo-volume" DEFAULT_CHECKPOINT="${DEFAULT_CHECKPOINT:-demo-sd15}" \
    .venv/bin/python scripts/run_demo_job.py "$@"
