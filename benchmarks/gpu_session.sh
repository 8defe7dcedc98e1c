#!/usr/bin/env bash
# One device-tool call per stage (each fits its 10-minute limit); logs and
# tables go to $OUT. Usage on the GPU machine, from the repository root:
#   bash benchmarks/gpu_session.sh tests      # build + every GPU-marked test
#   bash benchmarks/gpu_session.sh attention  # attention vs SDPA chain (bf16, fp32 precisions)
#   bash benchmarks/gpu_session.sh flex       # attention vs FlexAttention (compiles per shape)
#   bash benchmarks/gpu_session.sh ops        # pyramid + alignment loss vs eager / torch.compile
#   bash benchmarks/gpu_session.sh e2e        # training step and guidance throughput
set -uo pipefail
OUT=${OUT:-./out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 SSATTN_VALUE_CHECKS=0
build() { pip install --no-build-isolation --no-deps -q -e . 2>&1 | tail -3; python -m ssattn info; }
case "${1:-tests}" in
  tests)
    build
    timeout 420 python -m pytest tests -m gpu -q -p no:cacheprovider --durations=15 2>&1 | tee "$OUT/gpu-tests.log" | tail -40 ;;
  attention)
    build
    timeout 540 python benchmarks/peers_attention.py --dtypes bf16,fp32 --peers sdpa --out "$OUT/peers_attention.md" 2>&1 | tail -60 ;;
  flex)
    build
    timeout 540 python benchmarks/peers_attention.py --dtypes bf16 --peers flex --out "$OUT/peers_flex.md" 2>&1 | tail -40 ;;
  ops)
    build
    timeout 540 python -m pytest benchmarks/bench_pyramid.py benchmarks/bench_alignment.py -q -p no:cacheprovider \
      --benchmark-columns=min,median,rounds --benchmark-json="$OUT/bench_ops.json" 2>&1 | tee "$OUT/bench_ops.log" | tail -60 ;;
  e2e)
    build
    timeout 300 python benchmarks/bench_e2e.py 2>&1 | tee "$OUT/e2e.md" | tail -30
    timeout 200 python benchmarks/bench_guidance.py --images 512 --workers 8 2>&1 | tee "$OUT/guidance.log" | tail -20 ;;
  *) echo "unknown stage ${1}; use tests, attention, flex, ops or e2e" >&2; exit 2 ;;
esac
