#!/usr/bin/env bash
# One GPU check that fits one short GPU session (issue 12): within 8 minutes on an H100/H200 from a
# bare machine, run from the repository root:
#
#   bash benchmarks/gpu_check.sh            # everything; logs and $OUT/gpu_check.md (one markdown report)
#   bash benchmarks/gpu_check.sh --dry-run  # print the plan (stages, caps, commands); runs nothing on CUDA
#
# Stages, each under its own time cap, in this order (later ones still run when one fails):
#   1. build for sm_90 only (TORCH_CUDA_ARCH_LIST=9.0) and `ssattn info`
#   2. smoke subset of the GPU tests, -x (stops at the first failure)
#   3. the rest of the GPU tests, under what the budget leaves after stages 4-5
#   4. the headline attention benchmark (benchmarks/headline_attention.py: SPEC's four stages, bf16
#      fwd+bwd and fp32 TF32, vs the SDPA chain and SDPA's kernel alone; checks the backward first)
#   5. the image-word (short-key) attention benchmark (benchmarks/bench_text_attention.py: N = 65536 and
#      4096, L = 77, d = 32 and 64, bf16 and fp32, fwd and fwd+bwd, against SDPA with boolean and float
#      masks, with the memory roofline; FlexAttention and the general kernels left out: they compile
#      for ~1 min per shape and ~30 s in all)
#   6. the pyramid and alignment-loss benches (pytest-benchmark)
# GPU_CHECK_BUDGET (seconds, default 470) is the whole budget; the caps below are per stage.
set -uo pipefail
DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    *) echo "gpu_check.sh: unknown argument $arg (use --dry-run)" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-./out}
BUDGET=${GPU_CHECK_BUDGET:-470}
CAP_BUILD=160; CAP_SMOKE=100; CAP_HEADLINE=120; CAP_TEXT=60; CAP_BENCH=50; RESERVE=10
SMOKE="test_gpu_padding_and_zero_weights or test_gpu_deterministic or bf16-d32 or fp32-tf32-d32 or test_gpu_grid_cases or test_cuda_deterministic"
BENCH_K="(grid-B16-512 and (triton or eager or compile)) or (test_alignment_cuda_fwd_bwd and not compile)"
export PYTHONUNBUFFERED=1 SSATTN_VALUE_CHECKS=0 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-16}
START=$SECONDS
ROWS=()

left() { echo $(( BUDGET - (SECONDS - START) )); }

# stage NAME CAP LOG CMD...: run CMD under `timeout CAP`, log to $OUT/LOG, record a table row.
stage() {
  local name=$1 cap=$2 log=$3; shift 3
  if (( DRY )); then
    printf '%-10s cap %4ss  log %-22s %s\n' "$name" "$cap" "$log" "$*"
    return 0
  fi
  if (( cap <= 0 )); then
    ROWS+=("| $name | skipped | 0 | no time left in the budget |")
    return 0
  fi
  local t0=$SECONDS rc
  timeout "$cap" "$@" >"$OUT/$log" 2>&1
  rc=$?
  local last
  last=$(grep -E "passed|failed|error|Error" "$OUT/$log" | tail -1 | tr '|' '/' | cut -c1-150)
  [[ $rc -eq 124 ]] && last="TIMED OUT at ${cap}s; $last"
  ROWS+=("| $name | $rc | $(( SECONDS - t0 )) | ${last:-see $log} |")
  echo "[gpu_check] $name: rc $rc in $(( SECONDS - t0 )) s"
  return 0
}

if (( DRY )); then
  echo "gpu_check.sh plan (dry run: nothing is built or run; budget ${BUDGET}s, OUT=$OUT)"
  echo "env: TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST SSATTN_VALUE_CHECKS=$SSATTN_VALUE_CHECKS MAX_JOBS=$MAX_JOBS"
else
  mkdir -p "$OUT"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$OUT/gpu.txt" 2>&1
fi
stage build "$CAP_BUILD" build.log bash -c "pip install --no-build-isolation --no-deps -q -e . && python -m ssattn info"
stage smoke "$CAP_SMOKE" smoke.log python -m pytest tests -m gpu -x -q -p no:cacheprovider -k "$SMOKE"
rest_cap=$(( $(left) - CAP_HEADLINE - CAP_TEXT - CAP_BENCH - RESERVE ))
(( DRY )) && rest_cap="budget-left-minus-$(( CAP_HEADLINE + CAP_TEXT + CAP_BENCH + RESERVE ))"
stage tests "$rest_cap" tests.log python -m pytest tests -m gpu -v -p no:cacheprovider -k "not ($SMOKE)" --durations=10
headline_cap=$(( $(left) - CAP_TEXT - CAP_BENCH - RESERVE )); (( headline_cap > CAP_HEADLINE )) && headline_cap=$CAP_HEADLINE
(( DRY )) && headline_cap=$CAP_HEADLINE
stage headline "$headline_cap" headline.log python benchmarks/headline_attention.py --out "$OUT/headline.md"
text_cap=$(( $(left) - CAP_BENCH - RESERVE )); (( text_cap > CAP_TEXT )) && text_cap=$CAP_TEXT
(( DRY )) && text_cap=$CAP_TEXT
stage text "$text_cap" text.log python benchmarks/bench_text_attention.py --sides 256,64 --words 77 --head-dims 32,64 \
  --dtypes bf16,fp32 --peers sdpa --no-general --out "$OUT/text_attention.md"
bench_cap=$(( $(left) - RESERVE )); (( bench_cap > CAP_BENCH )) && bench_cap=$CAP_BENCH
(( DRY )) && bench_cap=$CAP_BENCH
stage benches "$bench_cap" benches.log python -m pytest benchmarks/bench_pyramid.py benchmarks/bench_alignment.py -m gpu \
  -q -p no:cacheprovider -k "$BENCH_K" --benchmark-columns=min,median,rounds --benchmark-json="$OUT/benches.json"
if (( DRY )); then
  echo "report: $OUT/gpu_check.md (stage table, headline table, text attention table, bench table)"
  exit 0
fi

{
  echo "# gpu_check ($(date -u '+%Y-%m-%d %H:%M UTC'))"
  echo
  echo "device: $(tr '\n' ' ' <"$OUT/gpu.txt" 2>/dev/null); commit $(git rev-parse --short HEAD 2>/dev/null); total $(( SECONDS - START )) s"
  echo
  echo "| stage | rc | seconds | last summary line |"
  echo "|---|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
  echo
  [[ -f "$OUT/headline.md" ]] && cat "$OUT/headline.md"
  echo
  [[ -f "$OUT/text_attention.md" ]] && cat "$OUT/text_attention.md"
  echo
  python - "$OUT/benches.json" <<'EOF' 2>/dev/null || echo "(no bench results)"
import json, sys
data = json.load(open(sys.argv[1]))
print("| bench | group | min ms | median ms | rounds |")
print("|---|---|---|---|---|")
for b in data["benchmarks"]:
    s = b["stats"]
    print(f"| {b['name']} | {b.get('group') or ''} | {s['min'] * 1e3:.3f} | {s['median'] * 1e3:.3f} | {s['rounds']} |")
EOF
} >"$OUT/gpu_check.md"
echo "[gpu_check] report: $OUT/gpu_check.md ($(( SECONDS - START )) s)"
cat "$OUT/gpu_check.md"
