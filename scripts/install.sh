#!/usr/bin/env bash
# Create .venv and install the studio. `--test` adds the test tools and the browser for the end-to-end test.
# GPU hosts (nvidia-smi works) get PyPI's CUDA build of torch; CPU hosts get torch 2.13.0, which resolves
# to a CPU build where pip's configured wheel folders hold one (override with ZIMAGE_TORCH="torch==X").
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
# tracker tests read real TensorBoard, MLflow, W&B files; auth: real hashes; ray: a real local Ray head; slurm: submitit
[ "${1:-}" = "--test" ] && extras="[test,trackers,auth,ray,slurm]"
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install -q)
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  torch_spec=${ZIMAGE_TORCH:-"torch>=2.4"}
else
  torch_spec=${ZIMAGE_TORCH:-"torch==2.13.0"}
fi
.venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" "$torch_spec"
"${pip[@]}" -e ".${extras}"
if [ -n "$extras" ] && [ -f scripts/install_browser.sh ]; then
  bash scripts/install_browser.sh
fi
