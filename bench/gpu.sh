#!/usr/bin/env bash
# One-shot GPU benchmark of swavctl: ResNet-50 2x224+6x96 SwAV throughput on one GPU (bf16 +
# channels_last, with and without torch.compile, CPU vs GPU augmentation, end to end from generated
# JPEGs), samples/s and MFU, and the suite's CUDA tests (correctness: the GPU against the CPU, and
# the GPU paths; their figures in $OUT/gpu_tests.log).
# About 9 minutes on an H200: run it with a 600 s limit.
#
#   bash bench/gpu.sh                  # results in $OUT (default ./bench-out): gpu_bench.json, gpu_bench.md, gpu.log, gpu_tests.log
#   BENCH_TINY=1 bash bench/gpu.sh     # tiny sizes: checks the script itself, on a GPU or a CPU
#   BENCH_BUDGET_S=540                 # overall budget in seconds for the phases (default 540)
#   BENCH_NO_INSTALL=1                 # skip 'pip install -e .' (PYTHONPATH is enough)
#
# Needs python3 with torch + torchvision (whatever the machine has: nothing is downloaded). Missing
# pure-Python dependencies (pydantic, rich, typer, tomli-w, safetensors, pytest, ...) are installed
# from wheels in .whl/ when that folder is there (bench/fetch_wheels.sh fills it).
# Afterwards, on a checkout:
#   python bench/gpu_bench.py --apply OUT/gpu_bench.json     # writes the GPU section of docs/benchmarks.md
set -u
cd "$(dirname "$0")/.."
REPO="$(pwd)"
OUT="${OUT:-$REPO/bench-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
exec > >(tee -a "$OUT/gpu.log") 2>&1
echo "[gpu.sh $(date +%T)] repo $REPO, results in $OUT"

if ! "$PY" -c 'import torch, torchvision' 2>/dev/null; then
  echo "[gpu.sh] ERROR: $PY cannot import torch and torchvision on this machine; nothing to benchmark."
  echo "[gpu.sh] (no network here: put torch/torchvision wheels for this Python in .whl/ to install them)"
  if ls .whl/torch-*.whl >/dev/null 2>&1; then
    "$PY" -m pip install --no-index --find-links .whl torch torchvision || true
  fi
  "$PY" -c 'import torch, torchvision' 2>/dev/null || {
    echo '{"error": "torch/torchvision not importable"}' > "$OUT/gpu_bench.json"; exit 3; }
fi
"$PY" - <<'PYEOF'
import torch, torchvision, sys
print(f"[gpu.sh] python {sys.version.split()[0]}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"cuda available {torch.cuda.is_available()}"
      + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
PYEOF

# Python < 3.11 has no tomllib: the tomli wheel stands in for it.
SHIM="$(mktemp -d)"
if ! "$PY" -c 'import tomllib' 2>/dev/null; then
  "$PY" -c 'import tomli' 2>/dev/null || "$PY" -m pip install -q --no-index --find-links .whl tomli 2>/dev/null
  echo 'from tomli import *  # noqa' > "$SHIM/tomllib.py"
  echo "[gpu.sh] Python without tomllib: using tomli"
fi

missing=$("$PY" - <<'PYEOF'
import importlib.util
need = {"pydantic": "pydantic", "rich": "rich", "typer": "typer", "tomli_w": "tomli-w",
        "safetensors": "safetensors", "numpy": "numpy", "PIL": "pillow", "pytest": "pytest"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
PYEOF
)
SITE="$(mktemp -d)"  # a fallback install target, when the machine's site-packages is read-only
if [ -n "$missing" ]; then
  echo "[gpu.sh] installing missing dependencies from .whl/: $missing"
  "$PY" -m pip install -q --no-index --find-links .whl $missing 2>/dev/null \
    || "$PY" -m pip install -q --no-index --find-links .whl --target "$SITE" $missing \
    || echo "[gpu.sh] WARNING: could not install: $missing"
fi

# Build: an editable install without touching the machine's torch; PYTHONPATH works either way.
if [ "${BENCH_NO_INSTALL:-0}" != 1 ]; then
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
    && echo "[gpu.sh] pip install -e . done" || echo "[gpu.sh] pip install -e . not possible here; using PYTHONPATH"
fi
export PYTHONPATH="$REPO:$SHIM:$SITE${PYTHONPATH:+:$PYTHONPATH}"
# The demo digits (the k-NN monitor's CUDA test) are made with scikit-learn; without it, use the
# folder bench/fetch_wheels.sh wrote ready.
if ! "$PY" -c 'import sklearn' 2>/dev/null && [ -f .whl/swavctl-cache/digits-v1/.complete ]; then
  export SWAVCTL_CACHE="$REPO/.whl/swavctl-cache"
  echo "[gpu.sh] no scikit-learn: the demo digits come from .whl/swavctl-cache"
fi
"$PY" -c 'import swavctl.cli.app, swavctl.train.loop' || { echo "[gpu.sh] ERROR: swavctl does not import"; exit 4; }

"$PY" bench/gpu_bench.py --out "$OUT"
status=$?
echo "[gpu.sh $(date +%T)] finished with status $status"
cat "$OUT/gpu_bench.md" 2>/dev/null
sleep 1  # let tee flush gpu.log
exit $status
