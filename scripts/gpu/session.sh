#!/usr/bin/env bash
# Lead's GPU call wrapper: environment report, carried wheels, then "$@" steps.
# Usage on the device: bash scripts/gpu/session.sh <step> [<step> ...] where a
# step is a shell command string; each runs with PYTHONPATH set, output teed
# into $OUT/<n>.log.
export PYTHONPATH=$PWD
export OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
if [ -d .whl ] && [ -f .gpu/install_wheels.sh ]; then
  eval "$(bash .gpu/install_wheels.sh 2>/dev/null)"
fi
# Triton's cache in a carried folder: fla caches its autotuning results
# there (cache_results=True), so a later call that carries .gpu back skips
# re-tuning (minutes per fla kernel at T = 64k). Only the small
# *.autotune.json files come back, in $OUT/triton-autotune.tgz: unpack it
# into .gpu/triton-cache here.
export TRITON_CACHE_DIR=$PWD/.gpu/triton-cache
mkdir -p "$TRITON_CACHE_DIR"
save_autotune() {
  (cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' -print0 |
     tar czf "$OUT/triton-autotune.tgz" --null -T -) 2>/dev/null
}
# SMI_LOG=<ms>: the SM clock, power and temperature every <ms> ms while the
# steps run, into $OUT/smi.csv (to tell a slower run from a throttled GPU).
SMI_PID=
if [ -n "${SMI_LOG:-}" ]; then
  nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu \
    --format=csv -lms "$SMI_LOG" > "$OUT/smi.csv" 2>&1 &
  SMI_PID=$!
fi
on_exit() {
  save_autotune
  if [ -n "$SMI_PID" ]; then kill "$SMI_PID" 2>/dev/null; fi
}
trap on_exit EXIT
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv,noheader
python3 -c "import jax, jaxlib; print('jax', jax.__version__, jaxlib.__version__, jax.devices())"
i=0
for step in "$@"; do
  i=$((i+1))
  echo "=== step $i: $step"
  start=$(date +%s)
  bash -c "$step" > "$OUT/step$i.log" 2>&1
  rc=$?
  echo "=== step $i rc=$rc in $(( $(date +%s) - start ))s; tail:"
  tail -n ${TAIL:-40} "$OUT/step$i.log"
done
