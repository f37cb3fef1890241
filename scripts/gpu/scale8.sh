#!/usr/bin/env bash
# Issue 8 on an 8-GPU host (nvidia-h200-x8), two calls; GPU groups run side
# by side where they are disjoint.
#   bash scripts/gpu/scale8.sh call1
#     GPUs 0-3: pytest -m gpu tests/test_parallel_gpu.py tests/test_models.py
#     GPU 4: 1-device rows (softmax N=16, linear, ringattention)
#     GPU 5: 1-device rows (softmax N=32)
#     GPUs 6,7: 2-device rows; then all 8 GPUs: 8-device rows
#   bash scripts/gpu/scale8.sh call2
#     GPUs 0-3: 4-device rows; GPUs 4,5: tests/test_models.py -m gpu, then
#     1- and 2-device rows left over; GPUs 6,7: the single-GPU test files
#     (linear, nn, Triton, backends), sharded; then 8-device rows left over
#   bash scripts/gpu/scale8.sh call3
#     GPUs 0-3: the 4-GPU strong-scaling rows call2 did not reach
# Rows: $OUT/rows-*.jsonl (merge here with
#   python -m attnjax.bench.parallel --scaling --from-rows a,b,... --info x).
# Weak scaling: 64k tokens per GPU (64k ... 512k); strong: T = 512k.
set -u
source scripts/gpu/multi_gpu_env.sh
SCALE="python3 -m attnjax.bench.parallel --scaling --weak-per-device 65536 --strong 524288"

case "${1:-}" in
  call1)
    ( export CUDA_VISIBLE_DEVICES=0,1,2,3
      step pytest-parallel 290 python3 -m pytest -p no:cacheprovider -m gpu \
        -v -rA --durations=8 tests/test_parallel_gpu.py tests/test_models.py ) &
    ( export CUDA_VISIBLE_DEVICES=4
      step scale-1a 290 ATTNJAX_BENCH_ROWS=$OUT/rows-1a.jsonl $SCALE \
        --devices 1 --kinds ring,lasp2,ringattention --max-call-s 20 ) &
    ( export CUDA_VISIBLE_DEVICES=5
      step scale-1b 290 ATTNJAX_BENCH_ROWS=$OUT/rows-1b.jsonl $SCALE \
        --devices 1 --kinds "'ulysses N=32'" --max-call-s 40 ) &
    ( export CUDA_VISIBLE_DEVICES=6,7
      step scale-2 290 ATTNJAX_BENCH_ROWS=$OUT/rows-2.jsonl $SCALE \
        --devices 2 --max-call-s 20 ) &
    wait
    step scale-8 250 ATTNJAX_BENCH_ROWS=$OUT/rows-8.jsonl $SCALE \
      --devices 8 --max-call-s 30 --budget-s 200 --out $OUT/scale-8.json
    ;;
  call2)
    ( export CUDA_VISIBLE_DEVICES=0,1,2,3
      step scale-4 290 ATTNJAX_BENCH_ROWS=$OUT/rows-4.jsonl $SCALE \
        --devices 4 --max-call-s 20 --budget-s 250 ) &
    ( export CUDA_VISIBLE_DEVICES=4,5
      step pytest-models 150 python3 -m pytest -p no:cacheprovider -m gpu \
        -v -rA -o faulthandler_timeout=100 tests/test_models.py
      step scale-2b 70 ATTNJAX_BENCH_ROWS=$OUT/rows-2b.jsonl $SCALE \
        --devices 1,2 --kinds lasp2
      step scale-2c 75 ATTNJAX_BENCH_ROWS=$OUT/rows-2c.jsonl $SCALE \
        --devices 2 --kinds "'ulysses N=32'" ) &
    ( step pytest-single 290 python3 scripts/gpu/shard_tests.py --gpus 6,7 \
        --log-dir $OUT tests/test_linear_pallas.py tests/test_nn.py \
        tests/test_pallas_triton_gpu.py tests/test_gpu_backends.py ) &
    wait
    step scale-8b 210 ATTNJAX_BENCH_ROWS=$OUT/rows-8b.jsonl $SCALE \
      --devices 8 --kinds "'all_gather,lasp2,ulysses N=32,ringattention'" \
      --max-call-s 30 --budget-s 170 --out $OUT/scale-8b.json
    ;;
  call3)  # what call2's time limit left: strong scaling at 4 GPUs (x4 or x8)
    ( export CUDA_VISIBLE_DEVICES=0,1,2,3
      step scale-4b 400 ATTNJAX_BENCH_ROWS=$OUT/rows-4b.jsonl $SCALE \
        --devices 4 --kinds "'all_gather,lasp2,ulysses N=32'" --max-call-s 20 \
        --out $OUT/scale-4b.json )
    ;;
esac
for f in "$OUT"/*.log; do echo "##### $f"; tail -n ${TAIL:-20} "$f"; done
# Few files come back: one rows file, one log of the bench steps.
if [ "${1:-}" = call2 ]; then
  for f in "$OUT"/rows-*.jsonl; do echo "{\"_file\": \"$(basename $f)\"}"; cat "$f"; done > "$OUT/call2-rows.jsonl"
  rm -f "$OUT"/rows-*.jsonl
  for f in "$OUT"/scale-*.log "$OUT"/pytest-single.log; do echo "##### $f"; grep -v "onstant fold\|reduce-window\|bug, run\|trade-off\|^$\|%map" "$f"; done > "$OUT/call2-bench.log"
  rm -f "$OUT"/scale-*.log "$OUT"/pytest-single.log
fi
