#!/usr/bin/env bash
# The first run on a GPU (H100 / H200), in one command and under 8 minutes:
#
#   bash tools/gpu_check.sh              # run everything, append a dated section to BENCHMARKS.md
#   bash tools/gpu_check.sh --dry-run    # any machine: print the commands, check that every file,
#                                        # config and flag they use exists, run one tiny CPU step per
#                                        # model family; exit 0
#   bash tools/gpu_check.sh --no-peers   # do not try to pip install the optional peers
#
# Steps (each under its own time limit; a step that fails or times out is recorded, not fatal):
#   1. optional peers for tools/bench_kernels.py (flash-linear-attention, accelerated-scan,
#      pararnn-torch, mamba-ssm): pip install, allowed to fail (wheels only, torch pinned by
#      constraints.txt); a note says which are missing
#   2. the GPU tests: tests/ops/test_{scan,ssd,newton}_triton.py run the compiled kernels on
#      the GPU (under Triton's interpreter without one), plus the tests that skip without CUDA
#      (bf16 SSD, the 40 GiB SSD shape, flash-attn)
#   3. python tools/bench_kernels.py (GPU defaults: realistic shapes, bf16, every peer found), as
#      four runs (--only scan / rglru / ssd / newton) so that a time limit costs one table only
#   4. megarnn bench step configs/quickstart.yaml model=configs/model/<m>.yaml for griffin-1b,
#      mamba2-1.3b and paragru-1b (tokens/s, MFU and peak memory of the step)
# then writes a section "GPU check (tools/gpu_check.sh), <date>" at the end of BENCHMARKS.md:
# the device (nvidia-smi), python / torch / CUDA / triton / deepspeed versions, and for every
# step the exact command, its exit status, wall time and result lines. Full logs stay in
# runs/gpu_check/<timestamp>/ (git-ignored).
#
# Environment: PYTHON (default .venv/bin/python, else python3); GPU_CHECK_OUT (the markdown
# file, default BENCHMARKS.md); GPU_CHECK_{PEERS,TESTS,KERNELS,STEP}_TIMEOUT seconds per step
# (defaults 30, 110, 30 x 5 kernel tables (+25 for scan), 50 x 3 models: 7.75 minutes at worst).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$(pwd)

DRY=0
PEERS=1
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        --no-peers) PEERS=0 ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
    esac
done

if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3; fi
OUT=${GPU_CHECK_OUT:-BENCHMARKS.md}
T_PEERS=${GPU_CHECK_PEERS_TIMEOUT:-30}
T_TESTS=${GPU_CHECK_TESTS_TIMEOUT:-110}
T_KERNELS=${GPU_CHECK_KERNELS_TIMEOUT:-30}  # scan gets 25 s more: its torch.compile peer compiles
T_STEP=${GPU_CHECK_STEP_TIMEOUT:-50}
MODELS=(griffin-1b mamba2-1.3b paragru-1b)
PEER_PACKAGES=(flash-linear-attention accelerated-scan pararnn-torch mamba-ssm)
GPU_TESTS=(tests/ops/test_scan_triton.py tests/ops/test_ssd_triton.py tests/ops/test_newton_triton.py
           tests/ops/test_conv_attention.py)
STAMP=$(date +%Y%m%d-%H%M%S)
LOGS=runs/gpu_check/$STAMP
export PIP_CONSTRAINT="$ROOT/constraints.txt" PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # on the GPU the kernels compile; never the interpreter

# The commands, exactly as run (and as written to BENCHMARKS.md).
PYTEST_CMD=("$PY" -m pytest -q -rs -p no:cacheprovider --timeout=60 "${GPU_TESTS[@]}")
KERNEL_OPS=(scan rglru ssd newton la)
kernels_cmd() { KERNELS_CMD=("$PY" tools/bench_kernels.py --only "$1"); }
kernel_limit() { if [[ $1 == scan ]]; then echo $(( T_KERNELS + 25 )); else echo "$T_KERNELS"; fi; }
step_cmd() {  # the bench command for model $1
    STEP_CMD=("$PY" -m megarnn bench step configs/quickstart.yaml "model=configs/model/$1.yaml"
              --steps 3 --warmup 1)
}

fail=0
say() { printf '%s\n' "$*"; }
problem() { say "CHECK FAILED: $*"; fail=1; }

# ------------------------------------------------------------------------------------------
# --dry-run: print the plan and check that everything it refers to exists
# ------------------------------------------------------------------------------------------
if (( DRY )); then
    say "gpu_check.sh --dry-run: the commands a GPU run would make (nothing is installed or timed)"
    command -v "$PY" >/dev/null 2>&1 || [[ -x "$PY" ]] || problem "python '$PY' not found"
    if (( PEERS )); then
        for p in "${PEER_PACKAGES[@]}"; do
            say "  [peers, <= ${T_PEERS}s in all] $PY -m pip install -q --only-binary=:all: $p   (may fail: noted)"
        done
    fi
    say "  [tests, <= ${T_TESTS}s] ${PYTEST_CMD[*]}"
    for op in "${KERNEL_OPS[@]}"; do kernels_cmd "$op"; say "  [kernels $op, <= $(kernel_limit "$op")s] ${KERNELS_CMD[*]}"; done
    for m in "${MODELS[@]}"; do step_cmd "$m"; say "  [step $m, <= ${T_STEP}s] ${STEP_CMD[*]}"; done
    say "  then: nvidia-smi; versions; append a dated section to $OUT"
    say ""
    command -v nvidia-smi >/dev/null 2>&1 && say "nvidia-smi: $(command -v nvidia-smi)" \
        || say "nvidia-smi: not found (expected on a machine without a GPU)"
    for f in tools/bench_kernels.py configs/quickstart.yaml constraints.txt "${GPU_TESTS[@]}"; do
        [[ -f "$f" ]] && say "ok  $f" || problem "missing file $f"
    done
    for m in "${MODELS[@]}"; do
        [[ -f "configs/model/$m.yaml" ]] && say "ok  configs/model/$m.yaml" || problem "missing configs/model/$m.yaml"
    done
    [[ -w "$OUT" || ( ! -e "$OUT" && -w . ) ]] && say "ok  $OUT is writable" || problem "$OUT is not writable"
    # The flags: each tool's --help must know the flags used.
    help=$("$PY" -m megarnn bench step --help 2>&1) || problem "megarnn bench step --help failed: $help"
    for flag in --steps --warmup; do
        grep -q -- "$flag" <<<"$help" && say "ok  megarnn bench step $flag" || problem "megarnn bench step has no $flag"
    done
    help=$("$PY" tools/bench_kernels.py --help 2>&1) || problem "tools/bench_kernels.py --help failed: $help"
    for op in "${KERNEL_OPS[@]}"; do
        grep -q -- "--only {.*$op" <<<"$help" && say "ok  tools/bench_kernels.py --only $op" \
            || problem "tools/bench_kernels.py has no --only $op"
    done
    "$PY" -c "import pytest_timeout" 2>/dev/null && say "ok  pytest --timeout (pytest-timeout)" \
        || problem "pytest-timeout is not installed (pip install -e '.[dev]')"
    # The configs with their overrides load and validate (the same load_config bench step uses).
    for m in "${MODELS[@]}"; do
        out=$("$PY" - "$m" <<'EOF' 2>&1
import sys
from megarnn.config import load_config
m = sys.argv[1]
cfg = load_config("configs/quickstart.yaml", [f"model=configs/model/{m}.yaml"])
print(f"{cfg.model.family}, d_model {cfg.model.d_model}, {cfg.model.n_layers} layers, "
      f"micro batch {cfg.train.micro_batch_size} x {cfg.data.seq_len} tokens")
EOF
        ) && say "ok  load_config quickstart + $m: $out" || problem "config quickstart + $m: $out"
    done
    # The GPU tests collect (on CPU under the interpreter, as the conftest arranges).
    out=$(TRITON_INTERPRET=1 "$PY" -m pytest -q --collect-only -p no:cacheprovider "${GPU_TESTS[@]}" 2>&1 | tail -1)
    [[ "$out" == *"tests collected"* || "$out" == *"test collected"* ]] && say "ok  pytest collects: $out" \
        || problem "pytest --collect-only: $out"
    # A tiny CPU variant of each step benchmark: the same command path and family, 1 step.
    for m in "${MODELS[@]}"; do
        tiny_model="configs/model/${m%%-*}-tiny.yaml"
        [[ -f "$tiny_model" ]] || { problem "no tiny config $tiny_model for the CPU variant of $m"; continue; }
        tiny=("$PY" -m megarnn bench step configs/quickstart.yaml "model=$tiny_model" data.seq_len=32
              data.vocab_size=512 train.micro_batch_size=2 --steps 1 --warmup 0)
        out=$(OMP_NUM_THREADS=1 timeout 300 "${tiny[@]}" 2>&1)
        if [[ $? -eq 0 ]] && grep -q "peak memory" <<<"$out"; then
            say "ok  tiny CPU step ($tiny_model): $(grep '^median' <<<"$out")"
        else
            problem "tiny CPU step (${tiny[*]}): $(tail -5 <<<"$out")"
        fi
    done
    (( fail )) && { say "dry run: FAILED"; exit 1; }
    say "dry run: all commands, files, configs and flags check out"
    exit 0
fi

# ------------------------------------------------------------------------------------------
# The real run
# ------------------------------------------------------------------------------------------
mkdir -p "$LOGS"
START=$(date +%s)
command -v nvidia-smi >/dev/null 2>&1 || say "warning: nvidia-smi not found; is this a GPU machine?"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || say "warning: torch sees no CUDA device: the kernels will not be timed on a GPU"

NAMES=() CMDS=() RCS=() SECS=() LOGFILES=()
run_step() {  # run_step NAME TIMEOUT CMD...: run with a time limit, log, record
    local name=$1 limit=$2; shift 2
    local log="$LOGS/$name.log" t0 rc
    say ""
    say "== $name (<= ${limit}s): $*"
    t0=$(date +%s)
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    NAMES+=("$name") CMDS+=("$*") RCS+=("$rc") SECS+=("$(( $(date +%s) - t0 ))") LOGFILES+=("$log")
    (( rc == 124 || rc == 137 )) && say "== $name: timed out after ${limit}s" || say "== $name: exit $rc"
}

PEER_NOTES=()
if (( PEERS )); then
    deadline=$(( $(date +%s) + T_PEERS ))
    for p in "${PEER_PACKAGES[@]}"; do
        left=$(( deadline - $(date +%s) ))
        if (( left < 5 )); then PEER_NOTES+=("$p: not tried (peer install time used up)"); continue; fi
        if timeout "$left" "$PY" -m pip install -q --only-binary=:all: "$p" >"$LOGS/pip-$p.log" 2>&1; then
            PEER_NOTES+=("$p: installed")
        else
            PEER_NOTES+=("$p: not installed ($(grep -m1 -iE 'error|no matching' "$LOGS/pip-$p.log" | cut -c1-120))")
        fi
        say "peer ${PEER_NOTES[-1]}"
    done
else
    PEER_NOTES+=("not tried (--no-peers)")
fi

run_step tests "$T_TESTS" "${PYTEST_CMD[@]}"
for op in "${KERNEL_OPS[@]}"; do
    kernels_cmd "$op"
    run_step "kernels-$op" "$(kernel_limit "$op")" "${KERNELS_CMD[@]}"
done
for m in "${MODELS[@]}"; do
    step_cmd "$m"
    run_step "step-$m" "$T_STEP" "${STEP_CMD[@]}"
done
TOTAL=$(( $(date +%s) - START ))

# ------------------------------------------------------------------------------------------
# The BENCHMARKS.md section
# ------------------------------------------------------------------------------------------
versions=$("$PY" - <<'EOF' 2>/dev/null
import platform
parts = [f"Python {platform.python_version()}"]
try:
    import torch
    parts.append(f"torch {torch.__version__} (CUDA {torch.version.cuda})")
except Exception as e:
    parts.append(f"torch: {e}")
for mod in ("triton", "deepspeed", "flash_attn", "fla", "mamba_ssm", "accelerated_scan", "pararnn"):
    try:
        m = __import__(mod)
        parts.append(f"{mod} {getattr(m, '__version__', '?')}")
    except Exception:
        if mod in ("triton", "deepspeed"):
            parts.append(f"{mod}: not importable")
print(", ".join(parts))
EOF
)
device=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
device=${device:-"no nvidia-smi ($(uname -m), $(nproc) CPUs)"}
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)

{
    echo ""
    echo "## GPU check (\`bash tools/gpu_check.sh\`), $(date +%Y-%m-%d)"
    echo ""
    echo "Device: $device. Versions: $versions. Commit $commit (plus uncommitted changes, if any)."
    echo "Total wall time ${TOTAL} s; full logs in \`$LOGS/\` on that machine."
    echo ""
    echo "| step | command | exit | wall s | result |"
    echo "|---|---|---|---|---|"
    for i in "${!NAMES[@]}"; do
        log=${LOGFILES[$i]} rc=${RCS[$i]}
        case "${NAMES[$i]}" in
            tests) result=$(grep -E '(passed|failed|error|skipped).* in [0-9.]+s' "$log" | tail -1) ;;
            kernels-*) result="$(grep -cE '^(scan|rglru|ssd|newton) ' "$log") rows (table below)" ;;
            step-*) result=$(grep -E '^median' "$log" | tail -1) ;;
        esac
        (( rc == 124 || rc == 137 )) && result="timed out${result:+ - }$result"
        [[ -z "${result:-}" ]] && result="(no result line; see the log) $(tail -1 "$log" | cut -c1-150)"
        echo "| ${NAMES[$i]} | \`${CMDS[$i]}\` | $rc | ${SECS[$i]} | ${result//|/\\|} |"
    done
    echo ""
    echo "Peers: $(IFS=';'; echo "${PEER_NOTES[*]}" | sed 's/;/; /g')."
    echo ""
    echo "Skipped tests (pytest -rs):"
    echo ""
    echo '```'
    grep -E '^SKIPPED' "$LOGS/tests.log" | cut -c1-200 || echo "none"
    echo '```'
    echo ""
    for op in "${KERNEL_OPS[@]}"; do
        kernels_cmd "$op"
        echo "\`${KERNELS_CMD[*]}\`:"
        echo ""
        echo '```'
        sed -n '/^device:/,$p' "$LOGS/kernels-$op.log" | head -60
        echo '```'
        echo ""
    done
} >"$LOGS/section.md"

cat "$LOGS/section.md" >>"$OUT"
say ""
say "appended to $OUT:"
cat "$LOGS/section.md"
bad=0
for rc in "${RCS[@]}"; do (( rc != 0 )) && bad=1; done
exit $bad
