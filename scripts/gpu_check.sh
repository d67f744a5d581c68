#!/usr/bin/env bash
# One-command GPU check of healthwatch on a machine with one CUDA GPU (about 8 minutes at most).
#
#   bash scripts/gpu_check.sh [OUT_DIR]        # default: $OUT if set, else ./gpu-check-out
#
# 1. Checks CUDA first and stops at once without it (exit 2, a clear message, and
#    OUT_DIR/gpu-check.json saying why): nothing is installed on a machine that cannot run the check.
# 2. Installs what the check needs, each step time-limited and allowed to fail (the sections that
#    need a missing package then skip, saying so): healthwatch itself (pip install -e .; torch is
#    expected to be preinstalled and is never replaced), transformers==5.23.0, tensorboard, wandb.
#    mamba-ssm is tried later by the check's own mamba_install section.
# 3. Runs scripts/gpu_check.py, which writes OUT_DIR/gpu-check.json and OUT_DIR/gpu-check.md.
#
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S (whole run, default 480).
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
OUT_DIR="${1:-${OUT:-./gpu-check-out}}"
PY="${PYTHON:-python3}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-480}"
START=$(date +%s)

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
if ! command -v "$PY" >/dev/null 2>&1; then
    echo "gpu_check.sh: FAILED — no Python interpreter '$PY' (set PYTHON=...)" >&2
    exit 2
fi
mkdir -p "$OUT_DIR" || { echo "gpu_check.sh: FAILED — cannot create $OUT_DIR" >&2; exit 2; }

# 1. CUDA or nothing (the Python side writes the result files when CUDA is absent).
"$PY" "$HERE/gpu_check.py" --out "$OUT_DIR" --probe-only
rc=$?
if [[ $rc -ne 0 ]]; then
    exit $rc
fi

# 2. Installs, bounded; results recorded for the JSON.
STATUS_FILE="$OUT_DIR/install-status.txt"
LOG="$OUT_DIR/install.log"
: >"$STATUS_FILE"
: >"$LOG"
pip_step() {  # pip_step NAME SECONDS ARGS...: run one pip install, record ok/failed
    local name="$1" secs="$2"
    shift 2
    echo "gpu_check.sh: pip install $* (limit ${secs}s)"
    if timeout --kill-after=10 "$secs" "$PY" -m pip install --disable-pip-version-check --retries 1 --timeout 20 "$@" >>"$LOG" 2>&1; then
        echo "$name=ok" >>"$STATUS_FILE"
        return 0
    fi
    echo "$name=failed" >>"$STATUS_FILE"
    return 1
}
# torch stays as installed: healthwatch's pin (torch<2.15) is checked, never upgraded in place.
TORCH_PIN="torch==$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')"
if ! pip_step healthwatch 150 -e "$REPO" "$TORCH_PIN"; then
    # Offline machine: no isolated build env can be fetched; build with what is installed.
    pip_step healthwatch-no-isolation 90 --no-build-isolation -e "$REPO" "$TORCH_PIN" || true
fi
pip_step transformers 120 "transformers==5.23.0" "$TORCH_PIN" || true
pip_step tensorboard-wandb 120 tensorboard wandb "$TORCH_PIN" || true

# 3. The check, within what is left of the budget.
LEFT=$(( BUDGET_S - ($(date +%s) - START) - 10 ))
if (( LEFT < 60 )); then
    LEFT=60
fi
"$PY" "$HERE/gpu_check.py" --out "$OUT_DIR" --budget-s "$LEFT" --install-status "$STATUS_FILE"
exit $?
