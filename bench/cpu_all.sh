#!/usr/bin/env bash
# Every CPU benchmark whose ratio docs/benchmarks.md reports against a baseline, one after the
# other, each run with the exact command its section cites (read from the section's
# "- Command: `...`" line). Each script rewrites its own section, between <!-- bench:NAME -->
# and <!-- /bench:NAME -->, and prints its figures as JSON. Every ratio is a median of at least 3
# alternating rounds of baseline and ours (the scripts refuse fewer: swavctl.bench.common.MIN_ROUNDS).
# Run it on a quiet machine (nothing else on the CPU): about 15 minutes on 2 cores.
#
#   bash bench/cpu_all.sh                    # all six sections, rewriting docs/benchmarks.md
#   bash bench/cpu_all.sh sinkhorn larc      # only these sections
#   BENCH_QUICK=1 bash bench/cpu_all.sh      # a check of the scripts: small sizes, 3 rounds, --no-doc
#   BENCH_DRY=1 bash bench/cpu_all.sh        # print each section's command only
#
# The train-step section needs lightly, the baseline (pip install -e '.[bench]'). OMP_NUM_THREADS and
# MKL_NUM_THREADS are unset, so each script runs with the threads its command asks for (or torch's
# default), as it did for the figures in the page. A script that fails is named at the end (exit 1).
set -u
cd "$(dirname "$0")/.."
DOC="docs/benchmarks.md"
PY="${PYTHON:-python}"
unset OMP_NUM_THREADS MKL_NUM_THREADS
ALL=(sinkhorn larc batch-padding train-step multicrop data-pipeline)
SECTIONS=("$@")
[ ${#SECTIONS[@]} -eq 0 ] && SECTIONS=("${ALL[@]}")

# Small sizes for BENCH_QUICK=1 (argparse keeps an option's last value, so these override).
quick_args() {
  case "$1" in
    sinkhorn) echo "--batch 256 --prototypes 300 --repeats 3" ;;
    larc) echo "--repeats 3" ;;
    batch-padding) echo "--batch 2 --rounds 3" ;;
    train-step) echo "--arch resnet18 --batch-size 2 --steps 3" ;;
    multicrop) echo "--images 2 --rounds 3" ;;
    data-pipeline) echo "--batch-size 4 --batches 2 --warmup 1 --rounds 3" ;;
  esac
}

# The command section $1 of the page cites.
command_of() {
  awk -v start="<!-- bench:$1 -->" -v end="<!-- /bench:$1 -->" '
    $0 == start { inside = 1; next }
    $0 == end { inside = 0 }
    inside && /^- Command: `/ { sub(/^- Command: `/, ""); sub(/`.*$/, ""); print; exit }
  ' "$DOC"
}

if [ "${BENCH_DRY:-0}" != 1 ] && [[ " ${SECTIONS[*]} " == *" train-step "* ]] \
  && ! "$PY" -c 'import lightly' 2>/dev/null; then
  echo "[cpu_all] WARNING: lightly is not installed, so train-step will fail: pip install -e '.[bench]' first"
fi
failed=()
started=$(date +%s)
for name in "${SECTIONS[@]}"; do
  cmd="$(command_of "$name")"
  if [[ ! "$cmd" =~ ^python\ bench/[a-z_]+\.py( [-A-Za-z0-9_.,=/]+)*$ ]]; then
    echo "[cpu_all] $name: no plain 'python bench/SCRIPT.py ...' command in its section of $DOC: '$cmd'"
    failed+=("$name")
    continue
  fi
  read -r -a words <<< "$cmd"
  extra=()
  if [ "${BENCH_QUICK:-0}" = 1 ]; then
    read -r -a extra <<< "$(quick_args "$name") --no-doc"
  fi
  if [ "${BENCH_DRY:-0}" = 1 ]; then
    echo "$name: $cmd${extra[*]:+ ${extra[*]}}"
    continue
  fi
  echo "[cpu_all $(date +%T)] $name: $cmd ${extra[*]:-} (load average $(cut -d' ' -f1-3 /proc/loadavg))"
  if ! "$PY" "${words[@]:1}" "${extra[@]}"; then
    failed+=("$name")
  fi
done
[ "${BENCH_DRY:-0}" = 1 ] || echo "[cpu_all $(date +%T)] done in $(( $(date +%s) - started )) s (load average $(cut -d' ' -f1-3 /proc/loadavg))"
if [ ${#failed[@]} -gt 0 ]; then
  echo "[cpu_all] FAILED: ${failed[*]}"
  exit 1
fi
