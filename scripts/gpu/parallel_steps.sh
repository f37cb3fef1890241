#!/usr/bin/env bash
# Sequence-parallel GPU session on a 4-GPU host (nvidia-h200-x4), two calls:
#   bash scripts/gpu/parallel_steps.sh call1   # GPUs 0,1 and 2,3 side by side
#   bash scripts/gpu/parallel_steps.sh call2   # all 4 GPUs
# Logs and rows (JSON lines) go to $OUT. NCCL_NVLS_ENABLE stays as set.
set -u
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
# Other people's uncommitted kernel edits in the shipped tree are replaced by
# the committed kernels (git archive HEAD pallas_kernels), when carried.
if [ -f build/parallel_head/pallas_kernels.tar ]; then
  tar -xf build/parallel_head/pallas_kernels.tar
  echo "pallas_kernels from commit $(cat build/parallel_head/HEAD)" > "$OUT/kernels.txt"
fi
source scripts/gpu/multi_gpu_env.sh

case "${1:-}" in
  call1)
    (  # GPUs 0,1: correctness tests, scaling at 1-2 GPUs, XLA flag check
      export CUDA_VISIBLE_DEVICES=0,1
      step pytest-gpu 180 python3 -m pytest -p no:cacheprovider -m gpu -v -rA \
        tests/test_parallel_gpu.py
      step scaling-1-2 220 ATTNJAX_BENCH_ROWS=$OUT/scaling-1-2.jsonl \
        python3 -m attnjax.bench.parallel --scaling --devices 1,2 \
        --budget-s 175 --max-call-s 12 --out $OUT/scaling-1-2.json
      step hlo 50 python3 scripts/gpu/parallel_hlo.py 131072
      for lhs in false true; do
        step lhs-$lhs 45 XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=$lhs \
          ATTNJAX_BENCH_ROWS=$OUT/lhs-$lhs.jsonl python3 -m \
          attnjax.bench.parallel --seqs 131072 --strategies ring \
          --no-ringattention
      done
    ) &
    (  # GPUs 2,3: issue 6 (1 vs 2 GPUs)
      export CUDA_VISIBLE_DEVICES=2,3
      step pairs 520 ATTNJAX_BENCH_ROWS=$OUT/pairs.jsonl \
        ATTNJAX_BENCH_BUDGET_S=460 python3 -m attnjax.bench --suite parallel \
        --out $OUT/bench
    ) &
    wait
    ;;
  call2)
    step pytest-gpu4 120 python3 -m pytest -p no:cacheprovider -m gpu -v -rA \
      tests/test_parallel_gpu.py -k four
    step scaling-4 420 ATTNJAX_BENCH_ROWS=$OUT/scaling-4.jsonl \
      python3 -m attnjax.bench.parallel --scaling --devices 4 \
      --budget-s 360 --max-call-s 15 --out $OUT/scaling-4.json
    ;;
esac
for f in "$OUT"/*.log; do echo "##### $f"; tail -n 25 "$f"; done
