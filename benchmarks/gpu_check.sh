#!/usr/bin/env bash
# Check a GPU host for Z-Image LoRA Studio: environment report, the GPU tests, the training benchmark.
#
#   bash benchmarks/gpu_check.sh [--wheels DIR] [--log FILE] [--budget SECONDS] [--steps N]
#
# Everything goes to one log (default gpu_check-<UTC time>.log in the current folder) and to the terminal.
# The host may be bare and offline (DESIGN.md section 6): the system's Python with CUDA torch, transformers,
# accelerate and peft. What else is missing (diffusers, bitsandbytes, nvidia-ml-py, ...) is installed from
# the wheel folder given with --wheels (pip install --no-index --no-deps), never from the network.
# The host's own pytest is used; pyproject's addopts (--timeout, which needs pytest-timeout) is overridden.
# Each part that cannot run is skipped with the reason; without CUDA the script ends in seconds with
# "no CUDA: skipped". Exit code: 0 when nothing failed (skips are not failures), else 1.
#   --budget  seconds for benchmarks/gpu_train.py (default 180; its cases past the budget are skipped)
#   PYTHON    the interpreter to use (default: python3)
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
WHEELS="" LOG="gpu_check-$(date -u +%Y%m%d-%H%M%S).log" BUDGET=180 STEPS=5
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS="$2"; shift 2 ;;
    --log) LOG="$2"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)"; exit 2 ;;
  esac
done
exec > >(tee -a "$LOG") 2>&1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
FAILED=0
section() { printf '\n== %s ==\n' "$1"; }
skip() { echo "SKIPPED: $1"; }

section "host"
echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')  host: $(hostname)  checkout: $ROOT"
echo "git: $(git -C "$ROOT" log -1 --format='%h %s' 2>/dev/null || echo 'not a git checkout')"
if ! command -v "$PY" >/dev/null 2>&1; then echo "no Python interpreter '$PY' (set PYTHON)"; exit 1; fi
echo "python: $("$PY" --version 2>&1) at $(command -v "$PY")"

section "driver"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=index,name,driver_version,memory.total,memory.used,utilization.gpu --format=csv || true
else
  skip "nvidia-smi not found (no NVIDIA driver on this host)"
fi

if [ -n "$WHEELS" ]; then
  section "wheels from $WHEELS"
  if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    missing=()
    for whl in "$WHEELS"/*.whl; do
      dist="$(basename "$whl" | cut -d- -f1)"
      if "$PY" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$dist" >/dev/null 2>&1; then
        echo "already installed: $dist"
      else
        missing+=("$whl")
      fi
    done
    if [ ${#missing[@]} -gt 0 ]; then
      "$PY" -m pip install --no-index --no-deps "${missing[@]}" || { echo "FAILED: pip install from $WHEELS"; FAILED=1; }
    fi
  else
    skip "no .whl files in $WHEELS"
  fi
fi

section "python packages"
"$PY" - <<'PYEOF'
import importlib.metadata as md
for name in ("torch", "diffusers", "transformers", "accelerate", "peft", "bitsandbytes", "nvidia-ml-py", "pytest"):
    try:
        print(f"{name:14s} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name:14s} not installed")
PYEOF

section "torch CUDA"
"$PY" - <<'PYEOF'
import sys
try:
    import torch
except ImportError as exc:
    print(f"torch cannot be imported: {exc}")
    sys.exit(3)
print(f"torch {torch.__version__}, built for CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
if not torch.cuda.is_available():
    sys.exit(3)
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}, "
          f"bf16 {torch.cuda.is_bf16_supported()}")
try:
    import bitsandbytes as bnb
    x = torch.randn(64, 64, device="cuda", requires_grad=True)
    opt = bnb.optim.AdamW8bit([x])
    x.sum().backward(); opt.step()
    print(f"bitsandbytes {bnb.__version__}: 8-bit AdamW step on CUDA ok")
except Exception as exc:
    print(f"bitsandbytes on CUDA: not usable ({type(exc).__name__}: {exc})")
PYEOF
cuda=$?
if [ "$cuda" -ne 0 ]; then
  echo
  echo "no CUDA: skipped (pytest -m gpu and benchmarks/gpu_train.py need a CUDA GPU)"
  echo "log: $LOG"
  exit $FAILED
fi

section "pytest -m gpu"
if "$PY" -c "import pytest" >/dev/null 2>&1; then
  (cd "$ROOT" && "$PY" -m pytest -o addopts= -p no:cacheprovider -m gpu -q -rs tests) || { echo "FAILED: pytest -m gpu"; FAILED=1; }
else
  skip "pytest is not installed for $PY"
fi

section "benchmarks/gpu_train.py (budget ${BUDGET} s)"
if "$PY" -c "import diffusers, peft" >/dev/null 2>&1; then
  limit=$(( ${BUDGET%.*} + 240 ))  # the budget decides when cases start; this stops a hung one
  timeout "$limit" "$PY" "$ROOT/benchmarks/gpu_train.py" --budget "$BUDGET" --steps "$STEPS" \
    || { echo "FAILED: gpu_train.py (exit $?)"; FAILED=1; }
else
  skip "diffusers / peft not installed (pass --wheels DIR)"
fi

section "summary"
[ "$FAILED" -eq 0 ] && echo "gpu_check: nothing failed" || echo "gpu_check: some parts FAILED (see above)"
echo "log: $LOG"
exit $FAILED
