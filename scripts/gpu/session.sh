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
