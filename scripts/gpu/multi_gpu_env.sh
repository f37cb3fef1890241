# Sourced by the multi-GPU session scripts (parallel_steps.sh, scale8.sh):
# carried wheels installed, the project on PYTHONPATH, the host's GPUs and
# links written to $OUT/env.txt, and step() to run one timed, logged step.
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
if [ -d .whl ] && [ -f .gpu/install_wheels.sh ]; then
  eval "$(bash .gpu/install_wheels.sh 2>/dev/null)"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=index,name,driver_version,clocks.max.sm,power.limit --format=csv,noheader > "$OUT/env.txt"
nvidia-smi topo -m >> "$OUT/env.txt" 2>&1
python3 -c "import jax, jaxlib; print('jax', jax.__version__, jaxlib.__version__, jax.devices())" >> "$OUT/env.txt" 2>&1
echo "NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE-unset} XLA_FLAGS=${XLA_FLAGS-unset}" >> "$OUT/env.txt"
cat "$OUT/env.txt"

step() {  # step <log> <timeout_s> <command...>
  local log=$1 lim=$2; shift 2
  local t0=$(date +%s)
  timeout "$lim" bash -c "$*" > "$OUT/$log.log" 2>&1
  echo "=== $log rc=$? in $(( $(date +%s) - t0 ))s"
}
