#!/usr/bin/env bash
# One command for the GPU day (issue 14, item 6): on a CUDA machine, from the repository root,
#
#     bash benchmarks/gpu_check.sh            # report: gpu-report-<date>.md (path printed at the end)
#
# installs what it needs, runs the GPU tests (every kernel against its reference in bf16/fp16/fp32, the fused
# loss's determinism), the CUDA-library and static-compile tests, and the quick benchmark suite on CUDA
# against PEFT, Liger-Kernel, Apple's cut-cross-entropy and (if it installs) Unsloth; writes everything with
# timestamps and nvidia-smi into one report. Each stage has a timeout; the whole stays under 8 minutes on one
# H100 (budget below). A failing stage is recorded and the next one still runs; the exit status is the number
# of failed stages. See docs/gpu.md.
#
# Environment: GPU_CHECK_PYTHON (default python3), GPU_CHECK_VENV (default .venv-gpu; an active venv is used as
# it is), GPU_CHECK_NO_INSTALL=1 (skip pip), GPU_CHECK_OUT (report path).
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
STAMP=$(date +%Y-%m-%d-%H%M)
REPORT=${GPU_CHECK_OUT:-$ROOT/gpu-report-$STAMP.md}
LOGDIR=$(mktemp -d "${TMPDIR:-/tmp}/fastft-gpu-check.XXXXXX")
START=$(date +%s)
FAILED=0

# stage budgets in seconds: 435 s in all (7.25 min), the rest of the 8 minutes for nvidia-smi and the report
T_INSTALL=110; T_KERNELS=120; T_DETERMINISM=25; T_CSRC=50; T_BENCH=130

say() { printf '%s\n' "$*" | tee -a "$REPORT"; }
elapsed() { echo $(( $(date +%s) - START )); }

stage() {  # stage NAME TIMEOUT CMD...: run, log, append the tail to the report
  local name=$1 limit=$2; shift 2
  local log="$LOGDIR/${name// /_}.log" t0 rc
  t0=$(date +%s)
  say ""; say "## $name"; say ""; say "started $(date -Is), timeout ${limit}s: \`$*\`"; say ""
  timeout --signal=INT --kill-after=15 "$limit" "$@" >"$log" 2>&1
  rc=$?
  {
    echo '```'
    if [ "$(wc -l <"$log")" -gt 120 ]; then echo "[... $(( $(wc -l <"$log") - 120 )) lines above in $log]"; fi
    tail -n 120 "$log"
    echo '```'
  } >>"$REPORT"
  if [ $rc -eq 0 ]; then say "**$name: passed** in $(( $(date +%s) - t0 )) s (total $(elapsed) s)"
  elif [ $rc -eq 5 ]; then say "**$name: NO TESTS RAN** (pytest exit 5: skipped, e.g. no CUDA device seen by torch)"; FAILED=$((FAILED + 1))
  elif [ $rc -eq 124 ] || [ $rc -eq 130 ]; then say "**$name: TIMED OUT** after ${limit} s (total $(elapsed) s)"; FAILED=$((FAILED + 1))
  else say "**$name: FAILED** (exit $rc) in $(( $(date +%s) - t0 )) s (total $(elapsed) s)"; FAILED=$((FAILED + 1)); fi
}

: >"$REPORT"
say "# fastft GPU check, $(date -Is)"
say ""
say "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?') on $(git rev-parse --abbrev-ref HEAD 2>/dev/null || echo '?'), host $(hostname); full logs in $LOGDIR"
say ""
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  say "**no NVIDIA GPU found (nvidia-smi -L failed): this script is for a CUDA machine.**"
  echo "report: $REPORT"
  exit 1
fi
say '```'; nvidia-smi 2>&1 | tee -a "$REPORT" >/dev/null; say '```'

# ---------------------------------------------------------------------------------------------- install
if [ -z "${VIRTUAL_ENV:-}" ]; then
  VENV=${GPU_CHECK_VENV:-.venv-gpu}
  [ -d "$VENV" ] || "${GPU_CHECK_PYTHON:-python3}" -m venv "$VENV"
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
fi
PY=python
if [ "${GPU_CHECK_NO_INSTALL:-0}" != 1 ]; then
  install() {
    set -e
    python -m pip install -q --upgrade pip
    # torch with CUDA first (pip's default wheel on Linux is the CUDA build), then fastft and the peers
    python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null || python -m pip install -q torch
    python -m pip install -q -e ".[test,bench]" pytest-xdist
    python -m pip install -q liger-kernel cut-cross-entropy
    python -m pip install -q unsloth || echo "unsloth did not install: its peer is skipped"
  }
  export -f install
  stage "install" "$T_INSTALL" bash -c install
fi
say ""
say '```'
$PY - <<'EOF' 2>&1 | tee -a "$REPORT" >/dev/null
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for name in ("triton", "transformers", "peft", "bitsandbytes", "liger_kernel", "cut_cross_entropy", "unsloth"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "installed"))
    except Exception as error:
        print(name, "not available:", type(error).__name__, str(error)[:120])
EOF
say '```'

# ------------------------------------------------------------------------------------------------ tests
unset TRITON_INTERPRET  # the real JIT: the tests run the kernels on the GPU
export PYTHONHASHSEED=0
# several workers: each Triton variant is JIT-compiled once (shared on-disk cache), in parallel
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
stage "kernels against the reference (bf16, fp16, fp32)" "$T_KERNELS" \
  $PY -m pytest -q -rfEs -p no:cacheprovider $XDIST tests/kernels/test_gpu_kernels.py --deselect tests/kernels/test_gpu_kernels.py::test_fused_loss_is_deterministic
stage "fused loss determinism (two runs, same bits)" "$T_DETERMINISM" \
  $PY -m pytest -q -rfEs -p no:cacheprovider tests/kernels/test_gpu_kernels.py::test_fused_loss_is_deterministic
stage "CUDA library (csrc) on the GPU" "$T_CSRC" \
  $PY -m pytest -q -rfEs -p no:cacheprovider tests/csrc/test_csrc.py -k cuda
stage "quick benchmark suite on CUDA (PEFT, Liger, CCE, Unsloth)" "$T_BENCH" \
  $PY -m benchmarks --quick --device cuda --out "$LOGDIR/bench" --no-progress
for f in "$LOGDIR"/bench/*summary*.md; do
  [ -f "$f" ] || continue
  say ""; say "### $(basename "$f")"; say ""; cat "$f" >>"$REPORT"
done
say ""
say "## predicted (roofline, not measured)"
say ""
$PY -m benchmarks.roofline >>"$REPORT" 2>&1 || true

say ""
say "---"
say "finished $(date -Is) in $(elapsed) s; failed stages: $FAILED"
echo "report: $REPORT"
exit "$FAILED"
