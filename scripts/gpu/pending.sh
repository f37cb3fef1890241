#!/usr/bin/env bash
# What was prepared without a GPU and not yet run (as of 2026-12-08, after
# run131), as calls of under 10 minutes on one GPU, most decisive first:
# wg4 (~9 min: four consumer warpgroups at H = 64, where eight of the
# ten rows below 1.0 are: GPU tests, the H = 64 forward grid, two rows
# without ping-pong / with 3 stages), utsplitdiag (~4 min: which delta
# GPU tests failed with ut_split under differentiation, run131, and
# whether they pass without it), tile1k
# (~5 min: H = 64 1k with the serial turn / no automatic barriers beside
# the early release: GPU tests, forward rows), nabrows (~8 min: every
# default forward without automatic SMEM barriers at the rows below 1.0;
# then nabsuite, ~8 min, if it wins), parts32k (~3 min: the
# delta rule's kernels alone at 32k, for the 10x goal), linpacked
# (~7 min: the scalar-gate kernels' packed weights, GPU tests and rows
# without / with), gatedparts (~6 min: fla's gated delta forward kernel
# by kernel beside ours), psmem128 (the forward's P ring at H = 128; at
# H = 64 it lost, run91), then linstages' occupancy step
# (scripts/gpu/linear_profile.py --occupancy), short, profile, gap64k,
# pftimes, pftests, call1, call2, call3
# (run127: mosaicsuite (the Mosaic GPU suite 122/122 with the early
# release the default at H = 64 up to 1k keys, the linear GPU tests
# 32/32); run128: earlyq64s (4 stages / 64-key blocks with it: +0-1% /
# -20%); run129: gradut2 (the delta rule's forward+backward at 32k: UT
# at 4 warps -3%, ut_split +7%); run130: utsplitgrad (ut_split under
# differentiation +4-7% at 4k-64k, both rules); run131: the delta GPU
# tests with it forced on (ad hoc): 3 failures in the first 36, cut by
# the step's limit)
# (run123: bq128 (its GPU tests 2/2; 4-16% slower than the default at
# H = 64 from 4k, +1-2% at 1k) with earlyq at H = 64 (+4% / +3% at 1k
# full MHA / GQA); run124: gradut (the UT pull-back at 8 warps: GPU tests
# 5/6, 64 columns bf16 off the gate gradients' tolerance, refused since;
# every 8-warp form slower); run125: earlyq64 (the default at H = 64 up
# to 1k keys: GPU tests 2/2, the 1k forward rows beside the former
# default); run126: the 1k forward+backward rows (ad hoc))
# (run119: earlyq (the H = 256 forward's early Q release: GPU tests 3/5,
# the two H = 256 cases out of SMEM with segment ids, since without them;
# sweepv64out's GPU tests 2/2; H = 256 rows beside the default); run120 /
# run121: more of them (ad hoc); run122: the H = 256 GPU tests 10/10 with
# it the default up to 4k keys, the report's H = 256 1k / 4k rows)
# (run114: utsplitwg3 (the split UT default's GPU tests 7/8, the eighth
# opt-in and cut by the step's limit; the three-consumer forward's test
# at 8k causal, 2/2: the default since; the delta rows with the split;
# the sweep at 32 columns and 4 stages); run115: 4 stages at 4k / 64k and
# forward+backward at 16k / 32k (both defaults since); run116: stages4
# (GPU tests 6/6, the report's delta rows; 4k forward+backward overflowed
# shared memory); run117: 4k forward+backward with the residual sweep's
# cap; run118: sweep_v64 again (2/2, but before sweep_v64_out existed))
# (run112 / run113: utsplit and its neighbours (ut_split at one warp and
# one TF32 pass +6% gated forward at 16k / 32k; the default since in the
# forward alone); gatedknobs2's warps / stages / block_v 32 ran with it
# in run113)
# (run108: the gated delta sweeps at 64k (three weight arrays 1.79 ms,
# one buffer 1.43; prefetch no help) and wg3causal8k (three consumers
# +3% / +6% at H = 64 8k causal MHA / GQA); run109: packed (the packed
# sweep weights' GPU tests 23/24 before the limit, the 24th in run110;
# delta rows unpacked / packed at 16k; the default since); run110 /
# run111: the packed delta rows at 32k / 64k and 4k beside fla (gated
# forward 64k 0.92 -> 1.05x))
# (run101: deltarows (the delta rule's 16k / 32k rows beside fla: fwd+bwd
# 0.994 / 1.01x); run102: wg3at4k (H = 64's three consumers at 4k full
# +7-10% forward) and gatedbwd (the gated reverse sweep's half fill, +6 /
# +9% at 16k / 32k, its GPU tests 7/7: the default since); run103: lpt
# (GPU tests 5/5; +2% at H = 128 4k causal GQA, slower elsewhere: opt-in);
# run104: three consumers at the other H = 64 rows (16k causal +5%, 4k
# causal and 1k full slower: the default from 4k full / 16k causal since);
# run105: those rows through the default path, the gated delta rows;
# run106: the whole Mosaic GPU suite, 115/115; run107: gatedfwd (the
# gated delta forward's block_v 64, UT at 4 warps, sweep at 8 warps: all
# 4-17% slower, defaults stay))
# (run96: the whole Mosaic GPU suite 113/113 after the dK/dV walk
# refactor, masked GQA's persistent dQ / dK/dV kernels timed apart, H =
# 256's persistent split-head dK/dV kernel timed (psplit, ad hoc), the
# delta forward without separate_output; run97: H = 256 4k / 16k with
# it; run98: deltabwd's block steps; run99: its GPU tests, out of memory
# (4 processes preallocating); run100: the same with preallocation off,
# 7/7 at each block)
# (run91: psmem (GPU tests 4/4; 5-10% slower forward at H = 64: opt-in);
# run92: pdkv (the persistent backward, +23% forward+backward at H = 128
# 1k full MHA); run93: its GPU tests 3/3 (ad hoc); run94: pbwd beside the
# two kernels over the grid (ad hoc); run95: the whole Mosaic GPU suite
# with it as the default, 112/112, and the report's T = 1k MHA rows)
# (run88: serialturn (GPU tests 3/3; +0-2% at H = 64, -5% at H = 128 16k
# causal GQA: opt-in); run89: split16k (2/4 splits +2-4% fwd, -3-4%
# fwd+bwd: one split stays); run90: call4 (the delta report rows))
# (run82: one13 (the Mosaic tests of dq_evict_last and the former step
# forms 7/7; ut_block_v and gram_parts GPU-tested and timed, both slower;
# the unweighted Gram pass tested and timed, kept); run83: the no-decay
# report rows; run84: bwd1k; run85: next1's first step (dispatch = the
# kernels); run86/run87: fwdprof)
# (run77: dpinit (the Mosaic suite 102/102 with the step forms then
# prepared, timed beside the defaults; all three became the defaults);
# run78-run80: rows6, rows5 and the Mosaic suite again with the new
# defaults (102/102; ad hoc through session.sh); run81: glarows)
# (run74: overlap (the Mosaic suite 98/98 with the new opaque zeros,
# i >> 31 against i // (bound + 1) timed; overlap_epilogue and 192-key
# blocks no faster); run75/run76: the report's H = 128 and H = 64 rows
# re-measured (ad hoc: report_rows for 128,128gqa,64, then 64gqa))
# (run72: deltatests, 21/22 (tf32_inverse float32 off float32's
# tolerance; now checked at float16's); run73: tf32 (its tests 4/4, and
# "tf32" no faster than "tf32x3": kept opt-in))
# (run68: chained; run69: combo (lincfg and splits trimmed: the split
# tilings and sweep_splits, both slower than the defaults); run70: the
# whole Mosaic GPU suite, 93/93; run71: the linear GPU tests, 48/67
# before the limit, none failed)
# (recheck, deltacand, oscores ran in run42; fwdrows, utsweep and mosaic
# in run43; reduce in run45, layouts in run46, waits in run47, stages in
# run48, gram and call5 in run49; fusedlen in run50, dqprefetch in run51,
# dqprefetch2 in run52, linstages2 in run53, linfla64 in run54,
# fuseddefault in run56, headgroup in run57, headgroup2 in run58,
# newdefault in run59, newdefault3 in run60, rows3 in run63, sweep1k in
# run64, h64default in run65, rows4 in run66: kept for reruns)
# (prefetch, prefetch2, prefetch3 are pftimes/pftests split per family,
# with tests). Each call goes through session.sh (wheels,
# Triton cache, one log per step in $OUT/stepN.log); every step has its own
# time limit so that a slow one cannot take the others' logs with it.
# SESSION=other.sh replaces session.sh (e.g. one that echoes the steps).
#
#   run(command="export ATTNJAX_BENCH_ROWS=$OUT/rows.jsonl; \
#                bash scripts/gpu/pending.sh call1", carry=[".whl", ".gpu"])
#
# When no machine can be started, each refused start costs 1-2 minutes of
# the session's device time (2026-12-06: nine refusals took 17 of the 30
# minutes; that afternoon four refusals took 90 to 210 s each, 11 minutes
# in all): wait out the window the refusal names before calling again,
# and once a machine is warm, run the next call at once (it is released
# 30 s after a call) with ad-hoc steps through session.sh, e.g.
#   bash scripts/gpu/session.sh "timeout 370 python3 -m pytest -m gpu \
#     -p no:benchmark -n 4 tests/..."
#
# The three prefetch calls test kernels' loads of small per-chunk vectors
# that Triton leaves unpipelined in the sequential sweeps (read without a
# GPU from the compiled TTGIR). If one call is all a session gets, take
# "pftimes": the timing steps of all three (no tests); "pftests" then runs
# their GPU tests, which must pass before any default changes.
# fusedwhy the Mosaic backward after run43's per-shape default (fused only
#        where each dK/dV CTA visits >= 16k query rows): its GPU tests (the
#        default at T = 4100 full GQA 4:1, and BwdConfig(stagger_q)), then
#        the fused kernel as is, without its final consumer join
#        ("fusednj", racy, timing only) and with staggered query blocks
#        ("fusedst") beside the default where the fused form lost (T = 4k
#        and 1k full MHA) and won (16k); then the T = 1k causal rows with
#        the two kernels (the default there now; untimed) beside
#        cuDNN/tokamax, and H = 64's three-consumer forward (wg3) at 16k
#        causal and full.
# mosaictests  the whole Mosaic GPU suite: the backward kernels compile
#        their masked loops only where the static ranges need them (since
#        the evening of 2026-12-05; CPU-interpreter-tested), the stagger
#        loop changed and the H = 64 forward default is per shape.
# short   the essentials, first: the GPU tests of the per-shape Mosaic
#        defaults (fused backward at T = 4100 full GQA, stagger_q, the
#        three-consumer H = 64 forward at T = 16434 with segments), the
#        fused backward's diagnostics at T = 4k and 1k full MHA ("fusednj"
#        no final join, "fusedst" staggered, "fusednr" dQ copied not
#        reduce-added, "fusednodq" no dQ; the last two wrong, timing
#        only). (Its delta steps, the tf32 inverse and sweep_splits,
#        ran in run69, run72 and run73.)
# splits  the delta forward (gated and not) and gated forward+backward
#        with the sweeps split over 1, 2, 4, 8 and 16 sequence splits at
#        T = 64k and 16k; then H = 64 at 16k full (the default now takes
#        wg3 there) and causal beside cuDNN / tokamax.
# profile the dK/dV kernel under Mosaic GPU's in-kernel profiler
#        (scripts/gpu/mosaic_profile.py): the fused backward where it lost
#        (T = 4k full MHA, 64 query blocks per CTA; T = 1k) and where it
#        won (4k full GQA 4:1, 256 per CTA), beside the two-kernel form's
#        dK/dV kernel: per-step times, the time outside the steps, the
#        gaps between CTAs on an SM.
# gap64k  where the gated delta forward loses its time at T = 64k, B = 1:
#        run43 measured it 0.42 ms slower than the ungated one there (3.35
#        against 2.93 ms) but only 0.02-0.04 ms at 16k-32k. The sweeps
#        with and without prefetch_weights, gated, zero gates in three
#        buffers and in one (run42 ran this at 32k only: no difference).
# fwdrows the delta rule's default forward (output_scores=None: the forward
#        alone forms the scores) in float32 on the GPU (the bf16 output_scores
#        tests passed in run42), then the forward rows beside fla at 16k-64k
#        with the states-only sweep back at 3 stages (run42 measured them
#        with it capped at 2; 4k was unaffected).
# utsweep the UT kernel alone at 2, 4 and 8 warps (and the inverses), now
#        also without the scores (the forward's UT kernel since run42):
#        compiled for an H100 under differentiation without scores it
#        spills 292 B at 2 warps (the default), 12 B at 4, none at 8.
#        If more warps win, num_warps_ut's default follows.
# deltacand  one call for both delta options at once: their GPU tests,
#        then the delta rows beside fla with both on as a candidate default
#        (ATTNJAX_DELTA_CONFIG; the report's info line records it). Take
#        it when the session has room for one call only; the per-option
#        timings (oscores, pftimes) say which of the two made the gain.
# oscores  the delta rule's DeltaConfig(output_scores=True) (the kernels
#        that use the scores form them; the UT kernel's spills 696/760 ->
#        292/292 B in an H100 compile) beside the default at 4k (fused
#        sweep) and 32k (separate_output), forward and forward+backward,
#        then its GPU tests.
# prefetch  the delta rule's sweeps with prefetch_weights (next chunk's
#        weights carried through the loop) against the default: timings
#        at 32k and 4k (gated, zero gates in three buffers and in one),
#        then its GPU tests. If it wins, make it the default and rerun
#        the delta rows (call4 without channel_gate).
# prefetch2  the same for the scalar-gate kernels (KernelConfig
#        prefetch_weights, through ATTNJAX_LINEAR_SCAN_CONFIG): benchmark
#        rows without and with it at 4k and 16k, then its GPU tests.
# prefetch3  GLA's ChannelConfig(early_decay=True) beside the default at
#        16k and beside the auto layout at 32k, then its GPU tests.
# call1  GPU tests of the untested linear kernels: GLA fused splits,
#        factored_rows, batch-1 grids, H = 128 compiles; delta ut_cols64
#        and the ieee inverse.
# mosaic the H = 64 forward with three consumer warpgroups beside cuDNN and
#        tokamax (its GPU tests and the fused backward's passed in run39),
#        then the H = 128 grid with today's defaults (the fused dK/dV
#        backward has not been timed in the grid since it became the
#        default), 16k first.
# call2  GLA profiles: T = 64k kernels (batch-1 grid, fused splits) and
#        T = 4k factored_rows.
# call3  delta gradient-kernel sweep (gradient halves, UT pull-back by
#        columns) at 4k.
# call4  the linear benchmark rows for the docs (GLA and both delta rules;
#        the H100 GLA rows are run12's, from before the GLA kernels'
#        retuning; the delta fwd+bwd rows are run41's, the fwd rows run43's).
#        (run73: inverse_dots="tf32" no faster; the default is unchanged.)
set -u
cd "$(dirname "$0")/../.."
S=${SESSION:-scripts/gpu/session.sh}
# A mosaic_check.py timing step under a time limit of $1 seconds (its own
# budget 10 s less, so that it prints its summary before the limit).
mc_time() {
  echo "timeout $1 python3 scripts/gpu/mosaic_check.py --sections time \
--budget $(($1 - 10))"
}
# The H100 softmax report's rows, merged into a copy of the report under
# $OUT/bench: "$R <heads> [--seqs ...]" is one step.
report_rows() {
  R="python3 -m attnjax.bench --suite softmax --impls mosaic,cudnn \
     --append --out $OUT/bench --heads"
  mkdir -p "$OUT/bench"
  cp docs/benchmarks/softmax-nvidia-h100-80gb-hbm3.json "$OUT/bench/"
}
# fwdprof's steps (also the end of next1): the H = 64 forward under the
# in-kernel profiler, the former row sums ("lshuffle") beside the default.
FWDPROF=(
  "timeout 200 python3 scripts/gpu/mosaic_profile.py --kernel fwd \
     --space 1800 --configs 64:4096:full:mha,64:4096:causal:mha \
     --variants ours,lshuffle"
  "timeout 120 python3 scripts/gpu/mosaic_profile.py --kernel fwd \
     --space 1000 --configs 64:16384:full:mha --variants ours")
PYTEST="python3 -m pytest -p no:cacheprovider -m gpu -v -rA --durations=10"
# The same over 4 processes (pytest-xdist, installed on the GPU machines):
# the GPU suites are compile-bound (5-10 s a test, the GPU idle), so four
# compile side by side; no process preallocates GPU memory.
PYTEST4="env XLA_PYTHON_CLIENT_PREALLOCATE=false $PYTEST -p no:benchmark -n 4"
# The Mosaic GPU tests selected by -k $1, then mosaic_check's timing of
# variants $4 at configs $3 within $2 seconds.
mosaic_tests_then_time() {
  bash $S \
    "timeout 120 $PYTEST4 tests/test_pallas_mosaic_gpu.py -k $1" \
    "$(mc_time "$2") --configs '$3' --variants $4"
}
# A sweep of ATTNJAX_DELTA_CONFIG overrides of the gated delta forward at
# 16k / 32k: the default first and again last (drift), then pick_config.
# "gated_knobs <tag> <json fields> ..." (one JSON object's fields a step);
# GK_PRE: a step to run first (in the same session: one numbering of logs).
gated_knobs() {
  local tag=$1 B="python3 -m attnjax.bench.linear --variants gated_delta \
--impls pallas --no-softmax --no-fla --seqs 16384,32768 --modes fwd"
  shift
  local steps=(${GK_PRE:+"$GK_PRE"}
               "ATTNJAX_BENCH_ROWS=\$OUT/${tag}0.jsonl timeout 70 $B") i=1
  for cfg in "$@"; do
    steps+=("ATTNJAX_BENCH_ROWS=\$OUT/${tag}$i.jsonl \
ATTNJAX_DELTA_CONFIG='{$cfg}' timeout 70 $B")
    i=$((i+1))
  done
  steps+=("ATTNJAX_BENCH_ROWS=\$OUT/${tag}z.jsonl timeout 70 $B"
          "python3 scripts/gpu/pick_config.py --variant gated_delta \
--mode fwd --baseline \$OUT/${tag}0.jsonl,\$OUT/${tag}z.jsonl \
\$OUT/${tag}[1-9].jsonl")
  bash $S "${steps[@]}"
}
case "${1:-}" in
  utsplitdiag)
    # run131: the delta rule's GPU tests with ut_split=True under
    # differentiation (ATTNJAX_DELTA_CONFIG; +4-7% forward+backward at
    # 4k-64k, run130) had 3 failures among the first 36 (the step's limit
    # cut it; -q printed no names). The override reaches only the tests
    # without a config of their own (matches_scan, long_sequence); each
    # with and without it, names printed as they finish; then the split's
    # own config tests (last passed in run114, before the 4-stage sweeps).
    bash $S \
      "ATTNJAX_DELTA_CONFIG='{\"ut_split\": true}' timeout 200 $PYTEST4 \
         tests/test_linear_delta_pallas.py -k 'matches_scan or long_seq'" \
      "timeout 200 $PYTEST4 tests/test_linear_delta_pallas.py \
         -k 'matches_scan or long_seq'" \
      "timeout 150 $PYTEST4 tests/test_linear_delta_pallas.py \
         -k 'kernel_configs and ut_split'"
    ;;
  wg4)
    # Four consumer warpgroups at H = 64 (FwdConfig(num_compute_wgs=4),
    # 64-key blocks, 112 registers each; no spills compiled for an H100):
    # where two consumers leave one warp a sub-partition working through
    # the softmax's dependent chain (run86), four leave three. Its GPU
    # tests, then the H = 64 grid's forward rows beside the default (4k
    # full / 16k causal: three consumers), then two rows without the
    # ping-pong ring and with 3 stages.
    bash $S \
      "timeout 120 $PYTEST4 tests/test_pallas_mosaic_gpu.py \
         -k 'four_consumer'" \
      "$(mc_time 280) --passes fwd --configs '64:*:*:*' \
         --variants ours,wg4,wg4e" \
      "$(mc_time 100) --passes fwd --configs '64:4096:full:mha,64:16384:causal:mha' \
         --variants ours,wg4,wg4np,wg4s3"
    ;;
  nabrows)
    # Every default forward without Pallas' automatic SMEM barriers
    # (mosaic_gpu._NO_AUTO_BARRIERS; 8 BAR.SYNC fewer a tile at H = 64
    # 1k, H100 compile) at the report's rows still below 1.0: H = 64
    # forward (the whole H = 64 grid), H = 256 4k full GQA / 16k full MHA,
    # then H = 64 forward+backward 4k full MHA / 16k full GQA.
    bash $S \
      "$(mc_time 330) --passes fwd --configs '64:*:*:*,256:4096:full:gqa,256:16384:full:mha' \
         --variants ours,nabdef" \
      "$(mc_time 150) --passes fwdbwd --configs '64:4096:full:mha,64:16384:full:gqa' \
         --variants ours,nabdef"
    ;;
  nabsuite)
    # If nabdef wins: the whole Mosaic GPU suite with every forward
    # compiled without automatic SMEM barriers (scripts/gpu/force_forms.py),
    # before it may become a default.
    bash $S \
      "ATTNJAX_KERNEL_FORMS=_NO_AUTO_BARRIERS=1 PYTHONPATH=\$PWD:\$PWD/scripts/gpu \
         timeout 540 $PYTEST4 -p force_forms tests/test_pallas_mosaic_gpu.py"
    ;;
  tile1k)
    # H = 64 at T = 1k (full GQA 0.95 of tokamax's 416.8, run128): the
    # serial turn (tokamax's step order; +1.7% there in run88, before the
    # early release) and no automatic SMEM barriers (8 BAR.SYNC fewer a
    # tile, H100 compile), with the early release (the default there),
    # and tokamax's 2 stages (earlyqs2): their GPU tests, then the
    # forward rows beside the default.
    bash $S \
      "timeout 200 $PYTEST4 tests/test_pallas_mosaic_gpu.py \
         -k 'no_auto_barriers or serial_turn'" \
      "$(mc_time 220) --passes fwd --configs '64:1024:*:*' \
         --variants ours,serialturn,nabdef,serialnab,earlyqs2"
    ;;
  recheck)
    # The default delta / scalar-gate / GLA kernels after the sweep-loop
    # restructuring (7a0a820 onward; not GPU-tested since run41).
    bash $S \
      "timeout 280 $PYTEST tests/test_linear_delta_pallas.py -k \
         'gpu_delta_kernel_configs and default'" \
      "timeout 150 $PYTEST tests/test_linear_pallas.py -k h128" \
      "timeout 150 $PYTEST tests/test_linear_channel.py -k \
         'gpu_channel_direct and (parallel32 or split32)'"
    ;;
  fwdrows)
    bash $S \
      "timeout 250 $PYTEST tests/test_linear_delta_pallas.py -k \
         '(gpu_delta_kernel_configs and default-float32) or \
         gpu_delta_matches_scan'" \
      "timeout 240 python3 -m attnjax.bench.linear --variants \
         delta,gated_delta --impls pallas --no-softmax --modes fwd \
         --seqs 16384,32768,65536"
    ;;
  fusedwhy)
    bash $S \
      "timeout 150 $PYTEST tests/test_pallas_mosaic_gpu.py -k \
         'default_without_determinism_flags or staggered'" \
      "$(mc_time 200) \
         --no-cudnn --no-tokamax --configs \
         '128:4096:full:mha,128:1024:full:mha,128:16384:full:mha' \
         --variants ours,fused,fusednj,fusedst,fusednr,fusednodq" \
      "$(mc_time 100) \
         --configs '128:1024:causal:*'" \
      "$(mc_time 130) \
         --configs '64:16384:causal:mha,64:16384:full:mha' \
         --variants ours,wg3"
    ;;
  first)
    # One call with the most at stake, for a session that may get only one:
    # the GPU tests of what changed in the backward kernels since their last
    # GPU run (pruned masked loops, the stagger, the H = 64 default), then
    # the fused dK/dV kernel under its profiler and its timing diagnostics
    # where it loses (T = 4k / 1k full MHA). Ran as run44: the cost is
    # the dQ reduce-add in every step, not a cost per CTA (see reduce).
    bash $S \
      "timeout 170 $PYTEST tests/test_pallas_mosaic_gpu.py -k \
         'TestMosaicGPUFusedBackward or head_dim_256_gradients or \
          test_seq_lengths or test_shapes_gqa and 190-450-4-2'" \
      "timeout 180 python3 scripts/gpu/mosaic_profile.py --configs \
         128:4096:full:mha --variants fused,bkvdq128,fusednj" \
      "$(mc_time 130) \
         --no-cudnn --no-tokamax --configs \
         '128:4096:full:mha,128:1024:full:mha' \
         --variants ours,fused,fusednj,fusedst,fusednr,fusednodq"
    ;;
  stages)
    # run47: at T = 4k full MHA the fused steps wait on the producer's Q
    # (wait_q 1.92 us a step reduce-added, 0.14 copied; 0.08 at 4k GQA).
    # One dS^T buffer frees 16 KB for a third Q/dO stage: GPU tests, then
    # the fused kernel with one buffer (fused1), with three stages
    # (fused3), and with the Q/dO slots released before the reduce-add is
    # issued (fusedel, fused3el: the producer's loads ahead of it in the
    # TMA unit); "fused3hc" adds the column-block accumulator (untimed).
    # Compiled for an H100 (T = 4k, B = 4): fused3 / fused3el spill 32 / 20
    # bytes, fusedel none.
    bash $S \
      "timeout 120 $PYTEST tests/test_pallas_mosaic_gpu.py -k \
         'test_one_ds_buffer or test_early_release'" \
      "$(mc_time 300) \
         --no-cudnn --no-tokamax --configs \
         '128:4096:full:mha,128:4096:causal:mha,128:1024:full:mha,128:16384:full:mha,128:4096:full:gqa' \
         --variants ours,fused,fused1,fused3,fusedel,fused3el"
    ;;
  waits)
    # run46 ruled out the accumulator's layout. Where does a fused step at
    # T = 4k full MHA spend the 2 us that the reduce-add adds outside the
    # dQ region? The profiler's new regions (wait_q, wait_do: the
    # producer's stages; wait_mma; dq_pair, dq_tma_wait), reduce-added
    # against copied, beside 4k GQA 4:1 (its traces truncated to the
    # first steps by the profiler's SMEM buffer); then the Mosaic GPU
    # suite but test_shapes_gqa.
    bash $S \
      "timeout 150 python3 scripts/gpu/mosaic_profile.py --space 500 \
         --configs 128:4096:full:mha,128:4096:full:gqa \
         --variants fused,fusednr" \
      "timeout 330 $PYTEST tests/test_pallas_mosaic_gpu.py -k \
         'not test_shapes_gqa'"
    ;;
  layouts)
    # run45: the reduce-add is cheap where a wave's CTAs reduce into one
    # head or heads N/K apart (16k MHA, 4k GQA 4:1: fused = copied dQ) but
    # not where they reduce into adjacent heads of dQ's [B, T, N, H] rows
    # (4k MHA: 6.2 against 4.2 us a step). The accumulator head-major
    # ("fusedhm") and in FA3's contiguous column blocks ("fusedhc"): GPU
    # tests, then timings where the fused form lost and won. (run46: all
    # passed; no layout changes the full rows, "nct" +7% at 4k causal.)
    bash $S \
      "timeout 150 $PYTEST tests/test_pallas_mosaic_gpu.py -k \
         'test_dq_layouts or test_gqa_ragged'" \
      "$(mc_time 330) \
         --no-cudnn --no-tokamax --configs \
         '128:4096:full:mha,128:1024:full:mha,128:4096:causal:mha,128:4096:full:gqa,128:16384:full:mha,64:4096:full:mha' \
         --variants ours,fused,fusedhm,fusedhc"
    ;;
  reduce)
    # run44: the fused backward's cost at T = 4k full MHA is the dQ
    # reduce-add (fused 336, dQ copied 500, no dQ 654 TFLOP/s; stagger_q
    # and the join change nothing). Why is it cheap at 16k MHA and 4k
    # GQA 4:1 (256 query blocks a CTA)? The profile of fused and copied dQ
    # at the three shapes (step times by place in the walk), then the
    # timings of the same variants there.
    bash $S \
      "timeout 200 python3 scripts/gpu/mosaic_profile.py --configs \
         128:4096:full:mha,128:4096:full:gqa,128:16384:full:mha \
         --variants fused,fusednr" \
      "$(mc_time 200) \
         --no-cudnn --no-tokamax --configs \
         '128:4096:full:gqa,128:16384:full:mha' \
         --variants ours,fused,fusednr,fusednodq"
    ;;
  grid|grid2)
    # The Mosaic column of the H100 softmax report with today's defaults,
    # beside cuDNN and tokamax mosaic in the same process (the report's
    # Mosaic rows are from 2026-11-22): grid H = 128 MHA and GQA, grid2
    # H = 64 and 256. Merged into a copy of the report under $OUT/bench
    # (--append); rows also in $ATTNJAX_BENCH_ROWS as they come.
    if [ "$1" = grid ]; then H="128 128gqa"; else H="64 256"; fi
    report_rows
    bash $S "timeout 280 $R ${H% *}" "timeout 280 $R ${H#* }"
    ;;
  linstages)
    # run49: 4 pipeline stages took the ungated forward from 156 to 176 M
    # tokens/s at 4k (109 -> 119 at 64k) and became its default; the gated
    # forwards keep 2. Its GPU test (H = 128, GQA, resets, initial state,
    # 1 and auto splits) with the small cases; the one-split occupancy
    # probe (is 16k's lower rate the program count or the length?); then
    # the no-decay rows beside fla at all four T.
    bash $S \
      "timeout 100 $PYTEST tests/test_linear_pallas.py -k \
         'ungated or matches_scan_small'" \
      "timeout 110 python3 scripts/gpu/linear_profile.py --occupancy" \
      "timeout 330 python3 -m attnjax.bench.linear --variants no_decay \
         --impls pallas --seqs 4096,16384,32768,65536 --no-softmax"
    ;;
  linstages2)
    # linstages without the occupancy probe (a short device budget).
    bash $S \
      "timeout 100 $PYTEST tests/test_linear_pallas.py -k \
         'ungated or matches_scan_small'" \
      "timeout 330 python3 -m attnjax.bench.linear --variants no_decay \
         --impls pallas --seqs 4096,16384,32768,65536 --no-softmax"
    ;;
  fusedlen)
    # Where does the fused backward start to win? run43-run48: it loses at
    # 64 query blocks a dK/dV CTA (4k MHA: 365 against 459 two kernels)
    # and ties or wins at 256 (16k MHA, 4k GQA 4:1); the default takes it
    # from 16k query rows a CTA (FUSED_MIN_ROWS). Here 128 blocks a CTA
    # (8k MHA full and causal, 2k GQA 4:1), the default (two kernels
    # there) beside the fused form, the fused form with dQ copied
    # (fusednr, wrong, timing only: its bound) and with every head's dQ
    # reduce-added into 8 heads' accumulator (fusedsl, wrong, timing only:
    # the same reduce-adds into an L2-resident accumulator; if it matches
    # fusednr at 4k MHA, dQ lines evicted between a head's CTAs are the
    # cost, and the fix is to keep them in L2, as FA3's EVICT_LAST hints);
    # then that fix (fusedev: BwdConfig(dq_evict_last=True); fusedevhc with
    # the column-block accumulator), after its GPU tests.
    bash $S \
      "timeout 90 $PYTEST tests/test_pallas_mosaic_gpu.py -k \
         test_dq_evict_last" \
      "$(mc_time 440) \
         --no-cudnn --no-tokamax --configs \
         '128:4096:full:mha,128:8192:full:mha,128:2048:full:gqa,128:4096:causal:mha,128:1024:full:mha' \
         --variants ours,fused,fusednr,fusedsl,fusedev,fusedevhc"
    ;;
  headgroup)
    # run50: the fused backward's reduce-adds cost nothing into an
    # accumulator that stays in L2 (fusedsl 501 against 369 at 4k full
    # MHA). BwdConfig(dq_head_group): one launch per group of (batch, K/V
    # head) pairs, each into its own accumulator zeroed right before it
    # (8 MHA heads at 4k: 16 MB). GPU tests, then the timing beside the
    # default, fused and fusedsl (the bound), where fused lost and won.
    bash $S \
      "timeout 100 $PYTEST tests/test_pallas_mosaic_gpu.py -k \
         test_dq_head_group" \
      "$(mc_time 440) \
         --no-cudnn --no-tokamax --configs \
         '128:4096:full:mha,128:1024:full:mha,128:4096:causal:mha,128:8192:full:mha,128:2048:causal:mha,64:4096:full:mha' \
         --variants ours,fused,fusedsl,fusedhg4,fusedhg8,fusedhg16,fusedhg8pf"
    ;;
  newdefault|newdefault2|newdefault3)
    # The grouped fused backward as the default (MHA from T = 2k, H <= 128,
    # without determinism flags; run57/run58): its GPU tests, then the H100
    # softmax report's Mosaic rows beside cuDNN (newdefault: H = 128 MHA
    # and GQA; newdefault2: H = 64, and H = 256's GPU tests).
    report_rows
    if [ "$1" = newdefault3 ]; then
      # run59's default tests stopped at the plan assertions of the two
      # grouped cases (the test's group sizes were wrong, not the kernel);
      # then H = 256's tests, the 16k GQA rows below cuDNN (causal 476 /
      # 524) with other backward forms, and the H = 64 report rows.
      bash $S \
        "timeout 100 $PYTEST tests/test_pallas_mosaic_gpu.py -k \
           test_default_without_determinism_flags" \
        "timeout 110 $PYTEST tests/test_pallas_mosaic_gpu.py -k \
           'head_dim_256'" \
        "$(mc_time 90) --no-cudnn --no-tokamax --configs \
           '128:16384:causal:gqa,128:16384:full:gqa' \
           --variants ours,bkvdq128,fusedhg1,fusedhg2" \
        "timeout 240 $R 64"
    elif [ "$1" = newdefault ]; then
      bash $S \
        "timeout 120 $PYTEST tests/test_pallas_mosaic_gpu.py -k \
           test_default_without_determinism_flags" \
        "timeout 250 $R 128" "timeout 180 $R 128gqa"
    else
      bash $S "timeout 250 $R 64" \
        "timeout 110 $PYTEST tests/test_pallas_mosaic_gpu.py -k \
           'head_dim_256'"
    fi
    ;;
  dpinit)
    # Ran as run77 (then named for the forms it timed, since the
    # defaults): the whole suite (test_former_step_forms runs the former
    # forms), then the defaults beside the former forms ("oldforms" all
    # three, "dpzero", "lshuffle") with cuDNN and tokamax, then the fused
    # backward at H = 64 beside "dqstatic".
    bash $S \
      "timeout 170 ${PYTEST4/-n 4/-n 6} tests/test_pallas_mosaic_gpu.py" \
      "$(mc_time 320) --configs \
         '64:4096:full:*,64:16384:causal:mha,128:1024:*:mha,128:16384:causal:gqa,128:4096:full:mha' \
         --variants ours,oldforms,dpzero,lshuffle" \
      "$(mc_time 80) --no-cudnn --no-tokamax --configs \
         '64:4096:full:gqa,64:16384:causal:gqa' --variants fused,dqstatic"
    ;;
  next1)
    # run78's bench row at H = 128 16k causal GQA fwd+bwd was 515 TFLOP/s,
    # run77's mosaic_check 550 for the same forms: both paths ("dispatch"
    # is attnjax.dot_product_attention, the bench's) in one process beside
    # cuDNN and tokamax; the same at H = 64 4k full MHA. Then fwdprof
    # (below), with the former row sums ("lshuffle") beside the default.
    # The SM clock and power every 250 ms go to $OUT/smi.csv.
    SMI_LOG=250 bash $S \
      "$(mc_time 150) --configs '128:16384:causal:gqa,64:4096:full:mha' \
         --variants dispatch,ours" "${FWDPROF[@]}"
    ;;
  bwd1k)
    # The report's H = 128 1k forward+backward rows (0.93 of tokamax's):
    # the two-kernel backward's dK/dV kernel under the in-kernel profiler
    # at 1k and, for scale, 4k full MHA (prologue, steps, epilogue, the gap
    # between CTAs on an SM), then the timing beside cuDNN and tokamax.
    bash $S \
      "timeout 200 python3 scripts/gpu/mosaic_profile.py --kernel bwd \
         --configs 128:1024:full:mha,128:1024:causal:mha,128:4096:full:mha \
         --variants ours" \
      "$(mc_time 100) --configs '128:1024:*:mha'"
    ;;
  fwdprof)
    # Where the H = 64 forward's block step spends its time (Mosaic GPU's
    # in-kernel profiler: wait_kv, wait_turn, wait_s, softmax, wait_pv,
    # rescale per step; first, last, epilogue per tile): the two-consumer
    # default at 4k full and causal (space 1800: what SMEM leaves with 3
    # stages), then the three-consumer default at 16k full (space 1000).
    # The 4k full forward is the report's lowest H = 64 row (0.92).
    bash $S "${FWDPROF[@]}"
    ;;
  rows6)
    # After dpinit, if it made any prepared form the default: the
    # report's H = 128 and H = 64 rows at 1k/4k/16k again.
    report_rows
    bash $S "timeout 300 $R 128,128gqa" "timeout 260 $R 64,64gqa"
    ;;
  rows5)
    # The report's rows not re-measured since the opaque loop zeros
    # (run75/run76 did H = 128 and H = 64 at 1k/4k/16k): H = 256 (its
    # backward has the change too; run63's rows) and H = 128 at 2k / 8k
    # (run66's rows).
    report_rows
    bash $S "timeout 170 $R 256" "timeout 170 $R 256gqa" \
      "timeout 110 $R 128 --seqs 2048,8192" \
      "timeout 110 $R 128gqa --seqs 2048,8192"
    ;;
  rows3|rows4)
    # The report's rows that predate the grouped fused backward default
    # (run59-run62 re-measured H = 64 and H = 128 at 1k/4k/16k) or that it
    # never had: rows3 H = 256 (2026-11-22) and GQA 4:1 at H = 256 and 64
    # (new head configs, the issue's grid); rows4 H = 128 at T = 2k and 8k
    # (run56).
    report_rows
    if [ "$1" = rows3 ]; then
      bash $S "timeout 180 $R 256" "timeout 180 $R 256gqa" \
        "timeout 180 $R 64gqa"
    else
      bash $S "timeout 170 $R 128 --seqs 2048,8192" \
        "timeout 170 $R 128gqa --seqs 2048,8192"
    fi
    ;;
  combo)
    # lincfg and splits trimmed into one call of about 6 minutes (device
    # time was short; without the sweep_splits GPU tests).
    C64='[{"num_splits": 2}, {"num_splits": 4},
      {"block_v": 32, "num_splits": 2}, {"block_v": 32, "num_splits": 4},
      {"block_v": 128, "num_warps": 8, "num_splits": 4},
      {"block_v": 16, "num_splits": 1}, {"block_v": 32, "num_splits": 1}]'
    bash $S \
      "timeout 90 $PYTEST4 tests/test_linear_pallas.py -k \
         'gpu_pallas_chained or gpu_pallas_matches_scan_h128'" \
      "timeout 140 python3 scripts/gpu/config_time.py --seqs 65536 \
         --configs '$C64'" \
      "cd scripts/gpu && timeout 120 python3 delta_profile.py --no-checks \
         --no-fla --seqs=32768 --splits=1,8,16"
    ;;
  packed)
    # DeltaConfig(packed_weights), the default since 2026-12-07: the
    # sweeps read wq, wk, the chunk decay and the log-gate sums as one
    # [C, 4] tile (run108: separate arrays cost the gated states-only
    # sweep 1.78 ms against 1.43 in one buffer at T = 64k, B = 1). Its GPU
    # tests (the default, the unpacked path, the sweep layouts), then the
    # delta rows unpacked and packed (beside fla) at 16k / 32k / 64k.
    L="python3 -m attnjax.bench.linear --variants delta,gated_delta \
       --impls pallas --no-softmax --seqs 16384,32768,65536"
    bash $S \
      "timeout 240 $PYTEST4 tests/test_linear_delta_pallas.py -k \
         'gpu_delta_matches_scan or gpu_delta_long or (gpu_delta_kernel_configs \
          and (default or unpacked or output_scores or prefetch_neither or \
          sweep_splits or neither or separate_output))'" \
      "ATTNJAX_BENCH_ROWS=\$OUT/unpacked.jsonl \
         ATTNJAX_DELTA_CONFIG='{\"packed_weights\": false}' \
         timeout 150 $L --no-fla" \
      "ATTNJAX_BENCH_ROWS=\$OUT/packed.jsonl timeout 170 $L"
    ;;
  deltatests)
    # run71 reached 48 of the 67 linear GPU tests (all passed); the rest
    # are the delta rule's kernel-config cases. Then short's tf32 UT
    # timing (DeltaConfig(inverse_dots="tf32"), whose test is among them).
    bash $S \
      "timeout 300 $PYTEST4 tests/test_linear_delta_pallas.py -k \
         'gpu_delta_kernel_configs and (output_scores or prefetch or \
          separate_output or split32 or substitution or sweep_splits or \
          tf32_inverse or ut_cols64 or warps_ut4)'" \
      "cd scripts/gpu && timeout 90 python3 delta_profile.py --no-checks \
         --no-fla --seqs=4096 --ut-sweep --ut-dots=tf32x3,tf32"
    ;;
  overlap)
    # FwdConfig(overlap_epilogue): each consumer issues the next tile's
    # first Q K^T beside its last P V and runs the epilogue under it (FA3).
    # Aimed at H = 64 below 16k, where our forward trails cuDNN most
    # (4k full MHA 0.89: 413 against 458 TFLOP/s in run43, while at 16k
    # the tile count matters less). Compiled for an H100: no spills at
    # H = 64 (8 B full), spills at H = 128. Also 192-key blocks at H = 64
    # (kv192, kv192s2: 11% fewer instructions per key in the unmasked
    # step's SASS), and the kernels' new opaque zeros (i >> 31 instead of
    # i // (bound + 1): forward 453 against 513 instructions a step at
    # H = 64, 496 / 556 at H = 128; dK/dV 486 / 519, dQ 343 / 372 at
    # H = 128) beside the former ones ("qdiv", forward and fwd+bwd). The
    # whole Mosaic GPU suite first (the default kernels changed).
    bash $S \
      "timeout 200 $PYTEST4 tests/test_pallas_mosaic_gpu.py" \
      "$(mc_time 230) --configs '64:4096:*:*,64:1024:full:mha' \
         --variants ours,qdiv,ovl,kv192,kv192s2" \
      "$(mc_time 110) --no-cudnn --no-tokamax --configs \
         '128:4096:full:mha,128:4096:causal:mha,64:16384:full:mha,128:16384:full:mha' \
         --variants ours,qdiv"
    ;;
  psmem)
    # The forward with P_j in a two-slot SMEM ring (mosaic_gpu._P_SMEM,
    # opt-in, H <= 128): in the H100 SASS the wait for P_j V_j moves from
    # before the first exponential (instruction 127 of 443 at H = 64, 158
    # of 486 at H = 128) to after the last (444 of 480, 450 of 518),
    # FlashAttention-3's intra-warpgroup overlap. Its GPU tests (H = 64
    # segments, causal, the three-consumer tile at 16k; H = 128 with
    # lengths), then the H = 64 grid rows beside the default, cuDNN and
    # tokamax (most of the rows below 1.0); psmem128 times H = 128.
    bash $S \
      "timeout 150 env XLA_PYTHON_CLIENT_PREALLOCATE=false python3 -m pytest \
         -p no:cacheprovider -m gpu -v -rA --durations=10 -p no:benchmark \
         -n 4 tests/test_pallas_mosaic_gpu.py -k p_in_smem" \
      "timeout 400 python3 scripts/gpu/mosaic_check.py --sections time \
         --budget 390 --configs '64:4096:*:*,64:1024:*:*,64:16384:*:mha' \
         --variants ours,psmem"
    ;;
  pdkv)
    # The two-kernel backward's dK/dV kernel on a persistent grid
    # (BwdConfig.persistent_dkv, opt-in): one Q / dO ring across each
    # CTA's items, the next item's K and V prefetched into L2. Its GPU
    # tests, then H = 128 at T = 1k (the forward+backward rows at 0.93,
    # where run84 found 13% of a dK/dV CTA outside its steps).
    bash $S \
      "timeout 170 env XLA_PYTHON_CLIENT_PREALLOCATE=false python3 -m pytest \
         -p no:cacheprovider -m gpu -v -rA --durations=10 -p no:benchmark \
         -n 4 tests/test_pallas_mosaic_gpu.py -k persistent_dkv" \
      "timeout 180 python3 scripts/gpu/mosaic_check.py --sections time \
         --budget 290 --configs '128:1024:*:*' --variants ours,pdkv,pbwd"
    ;;
  psplit)
    # (Ran ad hoc as run96 / run97: the split-head dK/dV kernel at H = 256
    # on a persistent grid, the default since, but for masked GQA.) The
    # whole Mosaic GPU suite, then H = 256 rows with "pdkv" beside the
    # default.
    bash $S \
      "timeout 280 env XLA_PYTHON_CLIENT_PREALLOCATE=false python3 -m pytest \
         -p no:cacheprovider -m gpu -q -rA --durations=10 -p no:benchmark \
         -n 4 tests/test_pallas_mosaic_gpu.py" \
      "timeout 200 python3 scripts/gpu/mosaic_check.py --sections time \
         --budget 190 --configs '256:1024:*:*,256:16384:causal:mha' \
         --variants ours,pdkv"
    ;;
  psmem128)
    # The same at H = 128 (T = 1k, 4k, 16k; MHA and GQA 4:1).
    bash $S \
      "timeout 560 python3 scripts/gpu/mosaic_check.py --sections time \
         --budget 550 --configs '128:*:*:mha,128:16384:causal:gqa' \
         --variants ours,psmem"
    ;;
  psmemsuite)
    # If psmem wins: the whole Mosaic GPU suite with P in the SMEM ring
    # (scripts/gpu/force_forms.py; H = 64 and 128 take it where it fits,
    # H = 256 keeps P in registers), about 2 minutes in 4 processes
    # (run79), before it may become a default.
    bash $S \
      "ATTNJAX_KERNEL_FORMS=_P_SMEM=1 PYTHONPATH=\$PWD:\$PWD/scripts/gpu \
         timeout 420 $PYTEST4 -p force_forms tests/test_pallas_mosaic_gpu.py"
    ;;
  deltabwd|gatedbwd)
    # The delta rule's (deltabwd) or the gated delta rule's (gatedbwd)
    # reverse-sweep tilings at T = 16k / 32k (B = 4 / 2), where the
    # ungated forward+backward trailed fla's chunk_delta_rule (run90:
    # 0.967 / 0.942): the value block (run98, ungated: 64 / 32 beat the
    # then default 32 / 16, which the ungated rule has taken since,
    # _BWD_FILL_UNGATED; the gated rule keeps one program per SM: 32 /
    # 16) and stages, the default first and last (drift); then the GPU
    # tests of the fastest override if it beats the default at both T by
    # more than 2% (the tests passed at both blocks in run100).
    V=$([ "$1" = gatedbwd ] && echo gated_delta || echo delta)
    B="timeout 80 python3 -m attnjax.bench.linear --variants $V \
       --impls pallas --no-softmax --no-fla --seqs 16384,32768 \
       --modes fwd+bwd"
    bash $S \
      "ATTNJAX_BENCH_ROWS=\$OUT/c0.jsonl $B" \
      "ATTNJAX_BENCH_ROWS=\$OUT/c1.jsonl ATTNJAX_DELTA_CONFIG='{\"block_v_bwd\": 64}' $B" \
      "ATTNJAX_BENCH_ROWS=\$OUT/c3.jsonl ATTNJAX_DELTA_CONFIG='{\"block_v_bwd\": 32}' $B" \
      "ATTNJAX_BENCH_ROWS=\$OUT/c4.jsonl ATTNJAX_DELTA_CONFIG='{\"num_stages_bwd\": 2}' $B" \
      "ATTNJAX_BENCH_ROWS=\$OUT/c7.jsonl $B" \
      "cfg=\$(python3 scripts/gpu/pick_config.py --variant $V \
         --baseline \$OUT/c0.jsonl,\$OUT/c7.jsonl \$OUT/c[1-4].jsonl); \
       echo \"picked: \$cfg\"; if [ -n \"\$cfg\" ]; then \
       ATTNJAX_DELTA_CONFIG=\"\$cfg\" XLA_PYTHON_CLIENT_PREALLOCATE=false \
         timeout 120 python3 -m pytest \
         -p no:cacheprovider -m gpu -v -rA -p no:benchmark -n 4 \
         tests/test_linear_delta_pallas.py -k 'matches_scan'; fi"
    ;;
  wg3causal8k)
    # H = 64 under a causal mask at T = 8k, between the 4k where three
    # consumer warpgroups lose (373 / 388, run104) and the 16k where they
    # win (468 / 445) and the default takes them (WG3_MIN_LEN_MASKED).
    bash $S \
      "$(mc_time 150) --configs '64:8192:causal:*' --variants ours,wg3"
    ;;
  gatedparts)
    # Where the gated delta forward's last 7-9% against fla goes at 16k /
    # 32k (0.93 / 0.91x, runs 109-110): fla's forward kernel by kernel
    # (torch.profiler), then ours (the UT kernel with and without scores,
    # the output kernel, the core forward; the states sweep alone is in
    # run108's profile at 64k).
    bash $S \
      "cd scripts/gpu && timeout 150 python3 delta_profile.py --no-checks \
         --fla-parts --seqs=16384,32768" \
      "cd scripts/gpu && timeout 240 python3 delta_profile.py --no-checks \
         --no-fla --output-scores --seqs=16384,32768"
    ;;
  utsplit)
    # DeltaConfig(ut_split) (prepared 2026-12-07, opt-in): T by one kernel
    # (no keys live whole: k k^T by 64-column slabs), U and W by a second
    # as whole [C, C] x [C, .] matmuls, as fla's forward splits it. The
    # fused UT kernel spills 264 bytes at 255 registers; the inverse kernel
    # alone still spills 184 with three TF32 passes, none with one (210
    # registers at 1, 2 or 4 warps). GPU tests, then the gated forward at
    # 16k / 32k (0.93 / 0.91x fla) without and with it.
    # (At the time num_warps_ut / inverse_dots set the split's first
    # kernel: num_warps_t / split_inverse_dots since.)
    GK_PRE="timeout 150 $PYTEST4 tests/test_linear_delta_pallas.py -k \
      'kernel_configs and ut_split'" gated_knobs u '"ut_split": true' \
      '"ut_split": true, "num_warps_t": 1, "split_inverse_dots": "tf32"' \
      '"ut_split": true, "num_warps_t": 4, "split_inverse_dots": "tf32"' \
      '"ut_split": true, "num_warps_t": 1, "split_inverse_dots": "tf32x3"'
    ;;
  utsplitgrad)
    # ut_split=True (the split UT transform under differentiation too: T
    # stored in float32 by the first kernel, U, W and the scores by the
    # second) against the default (fused there), forward+backward of both
    # rules; GPU tests of it passed in run112 (4 of 4).
    L="python3 -m attnjax.bench.linear --no-softmax --modes fwd+bwd \
       --seqs 4096,16384,32768,65536 --variants delta,gated_delta \
       --impls pallas --no-fla"
    bash $S \
      "ATTNJAX_BENCH_ROWS=\$OUT/g0.jsonl timeout 150 $L" \
      "ATTNJAX_BENCH_ROWS=\$OUT/g1.jsonl ATTNJAX_DELTA_CONFIG='{\"ut_split\": true}' timeout 150 $L"
    ;;
  parts32k)
    # Where the delta rule's forward+backward goes at T = 32k (goal: 10x
    # the best causal softmax, 12.2 M tokens/s; now 8.50 / 8.37, run116):
    # each kernel alone with today's defaults (run108's split at 64k, before
    # the packed weights: gradient kernels 4.05 ms of 10.1).
    bash $S \
      "cd scripts/gpu && timeout 240 python3 delta_profile.py --no-checks \
         --no-fla --seqs=32768"
    ;;
  gradut)
    # The delta rule's UT pull-back (split backward's second kernel) at 8
    # warps (run124: all slower than the default; by 64 columns off bf16's
    # tolerance, refused since): the GPU test by 16 columns, then the
    # gradient kernels alone at 32k and 4k in each form.
    bash $S \
      "timeout 200 $PYTEST4 tests/test_linear_delta_pallas.py -k \
         'kernel_configs and gut8'" \
      "cd scripts/gpu && timeout 300 python3 delta_profile.py --no-checks \
         --no-fla --seqs=32768,4096 --grad-sweep=ut"
    ;;
  gradut2)
    # Forward+backward at 32k (both rules) with the UT kernels that spill
    # less under differentiation, each in its own process: the default,
    # the fused UT kernel at 4 warps (8 bytes of spills against 696), the
    # split UT (none). (The pull-back's 8-warp forms lost in run124.)
    L="python3 -m attnjax.bench.linear --no-softmax --modes fwd+bwd \
       --seqs 32768 --variants delta,gated_delta --impls pallas --no-fla"
    bash $S \
      "ATTNJAX_BENCH_ROWS=\$OUT/u0.jsonl timeout 110 $L" \
      "ATTNJAX_BENCH_ROWS=\$OUT/u1.jsonl ATTNJAX_DELTA_CONFIG='{\"num_warps_ut\": 4}' timeout 110 $L" \
      "ATTNJAX_BENCH_ROWS=\$OUT/u2.jsonl ATTNJAX_DELTA_CONFIG='{\"ut_split\": true}' timeout 110 $L" \
      "ATTNJAX_BENCH_ROWS=\$OUT/u3.jsonl timeout 110 $L"
    ;;
  earlyq64s)
    # H = 64 at 1k (full GQA 0.944 of tokamax, run125) with the early Q
    # release and the SMEM it frees: 4 stages, or 64-key blocks over 4.
    bash $S \
      "timeout 200 python3 scripts/gpu/mosaic_check.py --sections time \
         --budget 190 --passes fwd --configs '64:1024:*:*' \
         --variants ours,earlyqs4,earlyqkv64"
    ;;
  earlyq64)
    # FwdConfig.early_q_release the default at H = 64 up to 1k keys (run123:
    # forward 1k full MHA 399.5 / 382.8, GQA 390.7 / 380.7): its GPU tests
    # (H = 64 full and causal with segment ids), then the H = 64 1k rows
    # (forward and forward+backward) beside the former default.
    bash $S \
      "timeout 120 $PYTEST4 tests/test_pallas_mosaic_gpu.py -k \
         'early_q_release and 64'" \
      "timeout 180 python3 scripts/gpu/mosaic_check.py --sections time \
         --budget 170 --passes fwd --configs '64:1024:*:*' \
         --variants ours,noearlyq"
    ;;
  bq128)
    # H = 64's forward with 128 query rows a consumer over 64-key blocks
    # (FwdConfig(block_q=128, block_kv=64), opt-in, untimed): its GPU
    # tests, then the H = 64 forward rows below 1.0 (1k full, 4k full and
    # causal, 16k causal MHA) beside the default, cuDNN and tokamax.
    bash $S \
      "timeout 150 $PYTEST4 tests/test_pallas_mosaic_gpu.py -k \
         query_blocks_128" \
      "timeout 400 python3 scripts/gpu/mosaic_check.py --sections time \
         --budget 390 --passes fwd \
         --configs '64:1024:full:*,64:4096:*:mha,64:4096:full:gqa,64:16384:causal:mha' \
         --variants ours,bq128kv64,bq128kv64s3,earlyq"
    ;;
  earlyq)
    # FwdConfig(early_q_release=True) (the default at H = 256 up to 4k
    # keys since run122): one Q buffer handed back after a tile's last
    # Q K^T, O out through small SMEM slots; for
    # H = 256, whose 4k full forward (634) trails its 16k one (670) over
    # the same 1,024 tiles. Its GPU tests with sweepv64out's, then the
    # H = 256 forward rows (and H = 128 at 1k, where one Q buffer with the
    # early release may beat two) beside the default, cuDNN and tokamax.
    bash $S \
      "timeout 200 $PYTEST4 tests/test_pallas_mosaic_gpu.py \
         tests/test_linear_delta_pallas.py -k \
         'early_q_release or (kernel_configs and sweep_v64_out)'" \
      "timeout 330 python3 scripts/gpu/mosaic_check.py --sections time \
         --budget 320 --passes fwd --configs '256:*:full:*,256:4096:causal:*,128:1024:full:*' \
         --variants ours,earlyq"
    ;;
  sweepv64out)
    # The residual sweep with the outputs at 64 value columns and 3 stages
    # (T = 4k's forward+backward, run117), as a GPU test.
    bash $S \
      "timeout 150 $PYTEST4 tests/test_linear_delta_pallas.py -k \
         'kernel_configs and sweep_v64_out'"
    ;;
  stages4)
    # The delta forward sweep's 4 stages and 32 columns at 32k (run114 /
    # run115): its GPU tests (the default, 32 and 64 columns), then the
    # delta / gated delta rows beside fla, forward and forward+backward.
    L="python3 -m attnjax.bench.linear --no-softmax \
       --seqs 4096,16384,32768,65536 --variants delta,gated_delta \
       --impls pallas"
    bash $S \
      "timeout 150 $PYTEST4 tests/test_linear_delta_pallas.py -k \
         'kernel_configs and (default or sweep_v)'" \
      "ATTNJAX_BENCH_ROWS=\$OUT/rows.jsonl timeout 330 $L --modes fwd,fwd+bwd"
    ;;
  utsplitwg3)
    # ut_split's default and wg3causal8kdefault in one call (a machine is
    # scarce): the delta GPU tests of ut_split's default, the three-consumer
    # H = 64 forward's GPU test at 8k causal, the delta / gated delta
    # forward rows beside fla, then both rules with the sweep at 32 value
    # columns (the automatic block is 16 at 32k and 64k, 32 at 16k, 64 at
    # 4k), and at 32 columns with 4 pipeline stages (run113: 4 stages +4%
    # at 16k, where the block is 32; -7% at 32k at 16 columns).
    L="python3 -m attnjax.bench.linear --no-softmax --modes fwd \
       --seqs 4096,16384,32768,65536"
    G="$L --variants delta,gated_delta --impls pallas --no-fla"
    bash $S \
      "timeout 120 $PYTEST4 tests/test_linear_delta_pallas.py -k \
         'kernel_configs and (default or ut_split or fused_ut)'" \
      "ATTNJAX_KERNEL_FORMS=WG3_MIN_LEN_MASKED=8192 \
         PYTHONPATH=\$PWD:\$PWD/scripts/gpu timeout 150 $PYTEST \
         -p force_forms tests/test_pallas_mosaic_gpu.py \
         -k default_three_consumer_forward" \
      "ATTNJAX_BENCH_ROWS=\$OUT/rows.jsonl timeout 200 $L \
         --variants delta,gated_delta --impls pallas" \
      "ATTNJAX_BENCH_ROWS=\$OUT/d3.jsonl ATTNJAX_DELTA_CONFIG='{\"block_v\": 32}' timeout 90 $G" \
      "ATTNJAX_BENCH_ROWS=\$OUT/d4.jsonl ATTNJAX_DELTA_CONFIG='{\"block_v\": 32, \"num_stages\": 4}' timeout 90 $G"
    ;;
  gatedknobs2)
    # The gated delta forward's sweep launch knobs that run107 did not
    # try, with the packed weights (16k / 32k, 0.93 / 0.91x fla): fla's
    # states kernel autotunes its warps and stages (chunk_delta_h.py), ours
    # runs 4 warps, 3 stages; and 32 value columns a program at 32k (the
    # automatic block there is 16; fla's sweep tries 32 and 64 only).
    # Baseline first and again last (drift).
    gated_knobs c '"num_warps": 2' '"num_stages": 4' '"num_stages": 2' \
      '"block_v": 32'
    ;;
  linpacked)
    # KernelConfig(packed_weights) (opt-in, prepared 2026-12-07): the
    # scalar-gate / fixed-decay sweeps read gc, wq, wk and the reset counts
    # as one [C, 4] tile (compiled for an H100: the forward's and dv's
    # loops lose their 2 synchronous loads, dq 3 -> 1, dk 4 -> 2), as the
    # delta rule's do since run109 (+3-30%). Its GPU tests, then the
    # fixed-decay and scalar-gate rows without and with it.
    L="python3 -m attnjax.bench.linear --variants fixed_decay,scalar_gate \
       --impls pallas --no-softmax --no-fla --seqs 4096,16384,65536"
    bash $S \
      "timeout 150 $PYTEST4 tests/test_linear_pallas.py -k \
         gpu_pallas_packed_weights" \
      "ATTNJAX_BENCH_ROWS=\$OUT/l0.jsonl timeout 150 $L" \
      "ATTNJAX_BENCH_ROWS=\$OUT/l1.jsonl \
         ATTNJAX_LINEAR_SCAN_CONFIG='{\"packed_weights\": true}' \
         timeout 150 $L"
    ;;
  wg3causal8kdefault)
    # run108 (wg3causal8k): three consumers at H = 64 causal 8k forward
    # 432.2 / 419.4 (MHA) and 454.6 / 427.4 (GQA) TFLOP/s against two. The
    # default's GPU test at that threshold (T = 8192 + 50, causal, forward
    # and gradients) and the whole-path rows at 8k with it: if both hold,
    # WG3_MIN_LEN_MASKED = 8192 (and the lowering test's causal-8k case).
    bash $S \
      "ATTNJAX_KERNEL_FORMS=WG3_MIN_LEN_MASKED=8192 \
         PYTHONPATH=\$PWD:\$PWD/scripts/gpu timeout 200 $PYTEST \
         -p force_forms tests/test_pallas_mosaic_gpu.py \
         -k default_three_consumer_forward"
    ;;
  gatedfwd)
    # The gated delta rule's forward at T = 16k / 32k / 64k (B = 4 / 2 /
    # 1), 0.93 / 0.94 / 0.92x fla's chunk_gated_delta_rule (run90): the
    # default, then the forward sweep's value block at 64 (one program per
    # SM or fewer), the UT kernel at 4 warps and the sweep at 8 warps;
    # pick_config names any override faster at every T by more than 2%,
    # whose GPU tests must then pass before it may become a default.
    B="timeout 70 python3 -m attnjax.bench.linear --variants gated_delta \
       --impls pallas --no-softmax --no-fla --seqs 16384,32768,65536 \
       --modes fwd"
    bash $S \
      "ATTNJAX_BENCH_ROWS=\$OUT/c0.jsonl $B" \
      "ATTNJAX_BENCH_ROWS=\$OUT/c1.jsonl ATTNJAX_DELTA_CONFIG='{\"block_v\": 64}' $B" \
      "ATTNJAX_BENCH_ROWS=\$OUT/c2.jsonl ATTNJAX_DELTA_CONFIG='{\"num_warps_ut\": 4}' $B" \
      "ATTNJAX_BENCH_ROWS=\$OUT/c3.jsonl ATTNJAX_DELTA_CONFIG='{\"num_warps\": 8}' $B" \
      "python3 scripts/gpu/pick_config.py --variant gated_delta --mode fwd \
         --baseline \$OUT/c0.jsonl \$OUT/c[1-3].jsonl"
    ;;
  serialturn)
    # The forward step in tokamax's order (mosaic_gpu._SERIAL_TURN,
    # opt-in): P V waited for inside the consumer's turn, Q K^T issued
    # after it. In the SASS of both forms every exponential follows the
    # wait for P V; tokamax's (2100 cycles a step at H = 64 4k full
    # against our 2300) also covers P V's completion in its turn. Its GPU
    # tests, then ours / serialturn beside cuDNN and tokamax at the H = 64
    # rows below 1.0 and at H = 128.
    mosaic_tests_then_time serial_turn_forward 300 \
      '64:4096:*:mha,64:1024:full:*,64:16384:causal:mha,128:4096:full:mha,128:16384:causal:gqa' \
      ours,serialturn
    ;;
  split16k)
    # The gated linear forwards at T = 16k, B = 4 (128 programs of 256
    # chunks at one split, the default there since run49) with 2 and 4
    # splits: run82's parts profile had the fixed-decay sweeps at 0.485 ms
    # for 256 programs of 128 chunks (32k) against 0.742 ms whole for the
    # one-split 16k forward. Forward and forward+backward, fixed decay and
    # scalar gate (and no decay, whose one split won in run49).
    bash $S \
      "timeout 150 python3 -m attnjax.bench.linear --variants \
         no_decay,fixed_decay,scalar_gate --impls pallas --no-softmax \
         --no-fla --seqs 16384" \
      "env ATTNJAX_LINEAR_SCAN_CONFIG='{\"num_splits\": 2}' timeout 150 \
         python3 -m attnjax.bench.linear --variants \
         no_decay,fixed_decay,scalar_gate --impls pallas --no-softmax \
         --no-fla --seqs 16384" \
      "env ATTNJAX_LINEAR_SCAN_CONFIG='{\"num_splits\": 4}' timeout 150 \
         python3 -m attnjax.bench.linear --variants \
         no_decay,fixed_decay,scalar_gate --impls pallas --no-softmax \
         --no-fla --seqs 16384"
    ;;
  one13)
    # first13 and parts squeezed into one call (2026-12-06 evening, when
    # the session's device time had gone to refused starts): the GPU
    # tests of both (the two Mosaic tests, ut_block_v32 and the delta
    # default, gram_parts and the ungated H = 128 path with the unweighted
    # Gram pass), then the parts profile (cut at its limit; the two Gram
    # forms come first), then ut_block_v 32 beside the default at 32k.
    bash $S \
      "timeout 110 $PYTEST4 tests/test_pallas_mosaic_gpu.py -k \
         'dq_evict_last or former_step_forms'" \
      "timeout 150 $PYTEST4 tests/test_linear_delta_pallas.py \
         tests/test_linear_pallas.py -k \
         '(gpu_delta_kernel_configs and (ut_block_v32 or default)) or \
          gram_parts_h128 or ungated_h128'" \
      "timeout 180 python3 scripts/gpu/linear_profile.py --parts" \
      "cd scripts/gpu && timeout 140 python3 delta_profile.py --no-checks \
         --no-fla --seqs=32768 --ut-blocks=32"
    ;;
  first13)
    # The session of 2026-12-06 evening: the two Mosaic GPU tests not run
    # since the thread-safe hint wrapper and the step-form rename
    # (test_dq_evict_last, test_former_step_forms), then utblock's steps.
    bash $S \
      "timeout 150 $PYTEST4 tests/test_pallas_mosaic_gpu.py -k \
         'dq_evict_last or former_step_forms'" \
      "timeout 150 $PYTEST4 tests/test_linear_delta_pallas.py -k \
         'gpu_delta_kernel_configs and (ut_block_v32 or default)'" \
      "cd scripts/gpu && timeout 280 python3 delta_profile.py --no-checks \
         --no-fla --seqs=4096,32768 --ut-blocks=32,64"
    ;;
  parts)
    # The linear forward's split path piece by piece (Gram pass, chain,
    # sweeps from the split starts, weights) at 16k / 32k / 64k, ungated
    # and fixed decay, then the Gram pass at other tilings: where 32k and
    # 64k (121 / 119 M tokens/s) lose ~0.19 ms against 16k's one-split
    # forward (185); Lightning Attention's "constant speed" goal. With
    # the Gram pass over 2 and 4 programs a split (KernelConfig.gram_parts,
    # opt-in) and its GPU test.
    bash $S "timeout 330 python3 scripts/gpu/linear_profile.py --parts" \
      "timeout 150 $PYTEST tests/test_linear_pallas.py -k \
         'gram_parts_h128 or ungated_h128'"
    ;;
  utblock)
    # DeltaConfig(ut_block_v): the UT kernel forms U and W by column
    # blocks, no spills at 32 (the default spills 264 B in the forward,
    # 696 / 760 B under differentiation; scripts/aot/ptxas_report.py).
    # Its GPU tests, then the UT kernel alone and the whole path at
    # 32 and 64 beside the default (T = 4k and 32k, gated).
    bash $S \
      "timeout 150 $PYTEST4 tests/test_linear_delta_pallas.py -k \
         'gpu_delta_kernel_configs and (ut_block_v32 or default)'" \
      "cd scripts/gpu && timeout 300 python3 delta_profile.py --no-checks \
         --no-fla --seqs=4096,32768 --ut-blocks=32,64"
    ;;
  glarows)
    # The H100 report's GLA rows (channel_gate) beside fla's chunk_gla and
    # causal softmax at 32k: the report's rows predate the in-kernel gate
    # sums (run38 profiled them on an H200 only). call4 without delta.
    bash $S \
      "timeout 330 python3 -m attnjax.bench.linear --variants channel_gate \
         --impls pallas --softmax-seqs 32768"
    ;;
  tf32)
    # run72: deltatests' 21 other cases passed; tf32_inverse-float32 was
    # 1.2e-3 off at float32's tolerance (TF32 keeps float16's mantissa: it
    # now checks float32 inputs at float16's). Its tests, then the UT
    # kernel and the whole path (T = 32k, B = 2, where the 10x-over-softmax
    # goal is measured) with "tf32" beside the default "tf32x3".
    bash $S \
      "timeout 150 $PYTEST4 tests/test_linear_delta_pallas.py -k \
         'gpu_delta_kernel_configs and (tf32_inverse or default)'" \
      "cd scripts/gpu && timeout 60 python3 delta_profile.py --no-checks \
         --no-fla --seqs=4096 --ut-sweep --ut-dots=tf32x3,tf32" \
      "cd scripts/gpu && timeout 200 python3 delta_profile.py --no-checks \
         --no-fla --seqs=32768,4096 --dots=tf32x3,tf32"
    ;;
  lincfg)
    # run68 found the chained forward slower than the split path (99
    # against 119 M tokens/s at 64k); its GPU tests did not run (pytest-
    # benchmark refuses xdist: -p no:benchmark since). Here the tests, then
    # the split path's tiling now that the Gram pass skips the last split:
    # fewer splits, narrower or wider value blocks, no split at all with
    # narrow value blocks (q k^T recomputed per block).
    C64='[{"num_splits": 2}, {"num_splits": 4}, {"num_splits": 16},
      {"block_v": 32, "num_splits": 2}, {"block_v": 32, "num_splits": 4},
      {"block_v": 32, "num_splits": 8},
      {"block_v": 128, "num_warps": 8, "num_splits": 4},
      {"block_v": 128, "num_warps": 8, "num_splits": 8},
      {"block_v": 128, "num_warps": 8, "num_splits": 16},
      {"block_v": 16, "num_splits": 1}, {"block_v": 32, "num_splits": 1}]'
    C4='[{"block_v": 32}, {"block_v": 16}, {"block_v": 128, "num_warps": 8}]'
    CB='[{"num_splits": 2}, {"num_splits": 4}, {"num_splits": 16}]'
    bash $S \
      "timeout 160 $PYTEST4 tests/test_linear_pallas.py -k \
         'gpu_pallas_chained or gpu_pallas_matches_scan_h128'" \
      "timeout 200 python3 scripts/gpu/config_time.py --seqs 65536 \
         --configs '$C64'" \
      "timeout 80 python3 scripts/gpu/config_time.py --seqs 4096 \
         --configs '$C4'" \
      "timeout 120 python3 scripts/gpu/config_time.py --fwdbwd \
         --seqs 65536 --configs '$CB'"
    ;;
  chained)
    # KernelConfig(chained_tile): the linear forward in one pass, tiles
    # chained by decoupled look-back (spin-waits on flags in global
    # memory; written and CPU-tested 2026-12-06, never run on a GPU). Its
    # GPU tests first (concurrent tiles, the walk over sums alone too),
    # then the forward beside the split path at B*T = 64k (the issue's
    # constant speed: 177 M tokens/s at 4k, 119 at 64k without a decay),
    # and forward+backward with 512-token tiles.
    bash $S \
      "timeout 160 $PYTEST4 tests/test_linear_pallas.py -k \
         'gpu_pallas_chained or gpu_pallas_matches_scan_h128'" \
      "timeout 240 python3 scripts/gpu/chained_time.py --fwdbwd \
         --seqs 4096,32768,65536 --tiles 512,1024,2048" \
      "timeout 140 python3 scripts/gpu/chained_time.py --serial \
         --variants no_decay,fixed_decay --seqs 65536 --tiles 256,1024"
    ;;
  h64default)
    # run64's H = 64 defaults: GQA fused in one launch from 16k query rows
    # a CTA, 128-query dQ tiles below T = 2k. Their GPU tests (the default
    # test's new GQA case; the H = 64 shapes, all below 2k), then the
    # report's H = 64 GQA rows and the MHA 1k rows.
    report_rows
    bash $S \
      "timeout 120 $PYTEST tests/test_pallas_mosaic_gpu.py -k \
         test_default_without_determinism_flags" \
      "timeout 170 $PYTEST tests/test_pallas_mosaic_gpu.py -k \
         'test_shapes_gqa and not 128'" \
      "timeout 130 $R 64gqa" "timeout 70 $R 64 --seqs 1024"
    ;;
  sweep1k)
    # The backward tilings at T = 1k (two kernels; tuned at 4k on the
    # H200 so far): H = 128 MHA forward+backward 367 against tokamax's
    # 397 (run59), H = 64 289 against cuDNN's 323. Spill-free at H = 128:
    # bst3, bwd64; at H = 64 all. Then the 16k causal GQA row (476-505
    # against cuDNN's 524): one launch, two kernels and 3 stages, FA3's
    # column-block dQ layout, one dS buffer with 3 stages. Last, H = 64
    # GQA 4:1 at 4k (two kernels by default; the fused forms unmeasured
    # there: run58 ran out of time before it).
    bash $S \
      "$(mc_time 100) --no-cudnn --no-tokamax --configs \
         '128:1024:full:mha,128:1024:causal:mha' \
         --variants ours,bst3,bwd64" \
      "$(mc_time 130) --no-cudnn --no-tokamax --configs \
         '64:1024:full:mha,64:1024:causal:mha' \
         --variants ours,bkvdq128,bqdq128,bst3,bwd64" \
      "$(mc_time 200) --no-cudnn --no-tokamax --configs \
         '64:4096:full:gqa,64:4096:causal:gqa,64:16384:full:gqa,64:16384:causal:gqa' \
         --variants ours,fused,fusedhg1,fusedhg2,fusedhg4" \
      "$(mc_time 120) --configs '128:16384:causal:gqa' \
         --variants ours,bst3,fusedhc,fused3"
    ;;
  headgroup2)
    # run57: BwdConfig(dq_head_group) beat both backward forms where timed
    # (4k full MHA: g = 8 511 against 461 for two kernels, 362 fused;
    # H = 64 4k full 391 / 331) but not at 1k (g = 16, 128 CTAs a launch:
    # 368 / 373). The group sizes around a 16 MB accumulator and two waves
    # of CTAs a launch, where the rule is unmeasured: 1k-2k, 16k, GQA,
    # H = 64 ("ours" is the default before the rule changes).
    bash $S \
      "$(mc_time 150) \
         --no-cudnn --no-tokamax --configs \
         '128:1024:full:mha,128:1024:causal:mha,128:2048:full:mha,64:1024:full:mha' \
         --variants ours,fusedhg16,fusedhg32,fusedhg64" \
      "$(mc_time 130) \
         --no-cudnn --no-tokamax --configs \
         '128:16384:full:mha,128:16384:causal:mha,64:16384:full:mha' \
         --variants ours,fusedhg1,fusedhg2,fusedhg4,fusedhg8" \
      "$(mc_time 150) \
         --no-cudnn --no-tokamax --configs \
         '128:4096:full:gqa,128:4096:causal:gqa,128:1024:full:gqa,64:4096:full:gqa' \
         --variants ours,fused,fusedhg2,fusedhg4,fusedhg8,fusedhg16" \
      "$(mc_time 100) \
         --no-cudnn --no-tokamax --configs \
         '64:4096:causal:mha,64:2048:full:mha,128:2048:full:gqa' \
         --variants ours,fusedhg8,fusedhg16,fusedhg32"
    ;;
  dqprefetch)
    # run50 (fusedlen): the fused backward with every head's dQ reduce-added
    # into 8 heads' L2-resident accumulator (fusedsl) reached 501 TFLOP/s
    # at 4k full MHA against 369 (dQ copied: 494.5; evict_last: 369.7):
    # the reduce-adds miss in L2 on the zeroed 128 MB accumulator. The fix
    # BwdConfig(dq_prefetch): the producer prefetches the dQ rows into L2
    # 0 / 2 / 4 steps ahead; GPU tests first, then the timing where the
    # fused form lost (4k full / causal, 1k) and won (8k, 16k).
    bash $S \
      "timeout 90 $PYTEST tests/test_pallas_mosaic_gpu.py -k \
         test_dq_prefetch" \
      "$(mc_time 460) \
         --no-cudnn --no-tokamax --configs \
         '128:4096:full:mha,128:1024:full:mha,128:4096:causal:mha,128:8192:full:mha,128:16384:full:mha' \
         --variants ours,fused,fusedsl,fusedpf0,fusedpf2,fusedpf4,fusedpfhc"
    ;;
  dqprefetch2)
    # run51: the dQ prefetch from every key tile's CTA helped 0 steps ahead
    # (4k full 370 -> 403, causal 396 -> 442) and hurt 2-4 ahead; here
    # only every 8th tile's CTA (e8) or tile 0's (e1k) prefetches.
    bash $S \
      "timeout 60 $PYTEST tests/test_pallas_mosaic_gpu.py -k \
         'test_dq_prefetch and 128-tnh-1-4'" \
      "$(mc_time 330) \
         --no-cudnn --no-tokamax --configs \
         '128:4096:full:mha,128:4096:causal:mha,128:1024:full:mha' \
         --variants ours,fused,fusedpf0,fusedpf0e8,fusedpf1e8,fusedpf2e8,fusedpf1e1k,fusedpf2e1k,fusedpf4e1k"
    ;;
  fuseddefault)
    # The fused backward's rule from 8k query rows a CTA (masked from T =
    # 8k; run50/run51/run55): its GPU tests, then the softmax bench rows
    # at H = 128, T = 8k beside cuDNN (the default path, no flags).
    bash $S \
      "timeout 100 $PYTEST tests/test_pallas_mosaic_gpu.py -k \
         test_default_without_determinism_flags" \
      "timeout 150 python3 -m attnjax.bench --suite softmax \
         --impls mosaic,cudnn --heads 128,128gqa --seqs 2048,8192 --no-write"
    ;;
  linfla64)
    # run49's bench stopped at its limit before fla at 32k (scalar gate)
    # and 64k: the fixed-decay and scalar-gate rows there beside fla.
    bash $S \
      "timeout 450 python3 -m attnjax.bench.linear --variants \
         fixed_decay,scalar_gate --impls pallas --seqs 32768,65536 \
         --no-softmax"
    ;;
  mosaicsuite)
    # The whole Mosaic GPU suite (129 tests; 122 took 405 s in run127) in
    # 4 processes (in one, over two calls: mosaictests, mosaictests2).
    # (Until run127 it also ran the linear GPU tests, now lineartests: the
    # two no longer fit one call's 10 minutes.)
    bash $S \
      "timeout 540 $PYTEST4 tests/test_pallas_mosaic_gpu.py"
    ;;
  lineartests)
    # The scalar-gate / GLA kernels' GPU tests (32 took 110 s, run127).
    bash $S \
      "timeout 200 $PYTEST4 tests/test_linear_pallas.py"
    ;;
  mosaictests)
    # The Mosaic GPU suite in two calls (run47: the suite but
    # test_shapes_gqa outran 330 s after 47 of 56 passed, none failed):
    # test_shapes_gqa and the fused backward's class here, the rest of
    # TestMosaicGPU in mosaictests2.
    bash $S \
      "timeout 280 $PYTEST tests/test_pallas_mosaic_gpu.py -k \
         test_shapes_gqa" \
      "timeout 280 $PYTEST tests/test_pallas_mosaic_gpu.py -k \
         TestMosaicGPUFusedBackward"
    ;;
  mosaictests2)
    bash $S \
      "timeout 450 $PYTEST tests/test_pallas_mosaic_gpu.py -k \
         'TestMosaicGPU and not TestMosaicGPUFused and not test_shapes_gqa'"
    ;;
  short)
    bash $S \
      "timeout 150 $PYTEST tests/test_pallas_mosaic_gpu.py -k \
         'default_without_determinism_flags or staggered or \
          default_three_consumer'" \
      "$(mc_time 130) \
         --no-cudnn --no-tokamax --configs \
         '128:4096:full:mha,128:1024:full:mha' \
         --variants ours,fused,fusednj,fusedst,fusednr,fusednodq"
    ;;
  splits)
    # DeltaConfig(sweep_splits): its GPU tests, then the delta forward
    # (gated and not) and gated forward+backward over 1-16 splits at the
    # issue's 32k (10x causal softmax forward+backward: 11.9 M tokens/s
    # against cuDNN's 1.19) and 64k; then H = 64 at 16k.
    bash $S \
      "timeout 120 $PYTEST4 tests/test_linear_delta_pallas.py -k \
         'gpu_delta_kernel_configs and sweep_splits'" \
      "cd scripts/gpu && timeout 300 python3 delta_profile.py --no-checks \
         --no-fla --seqs=32768,65536 --splits=1,4,8,16" \
      "$(mc_time 180) \
         --configs '64:16384:full:mha,64:16384:causal:mha' \
         --variants ours,wg3"
    ;;
  profile)
    bash $S \
      "timeout 300 python3 scripts/gpu/mosaic_profile.py --configs \
         128:4096:full:mha,128:4096:full:gqa --variants fused,bkvdq128" \
      "timeout 200 python3 scripts/gpu/mosaic_profile.py --configs \
         128:1024:full:mha --variants fused,bkvdq128,fusednr"
    ;;
  gap64k)
    bash $S \
      "cd scripts/gpu && timeout 300 python3 delta_profile.py --no-checks \
         --no-fla --seqs=65536 --prefetch"
    ;;
  utsweep)
    bash $S \
      "cd scripts/gpu && timeout 250 python3 delta_profile.py --no-checks \
         --no-fla --seqs=4096 --ut-sweep" \
      "cd scripts/gpu && timeout 250 python3 delta_profile.py --no-checks \
         --no-fla --seqs=65536 --ut-sweep"
    ;;
  pftimes)
    B="python3 -m attnjax.bench.linear --variants fixed_decay,scalar_gate \
       --impls pallas --no-fla --no-softmax --seqs 16384"
    bash $S \
      "cd scripts/gpu && timeout 160 python3 delta_profile.py --no-checks \
         --no-fla --seqs=32768 --prefetch" \
      "timeout 110 $B" \
      "ATTNJAX_LINEAR_SCAN_CONFIG='{\"prefetch_weights\": true}' \
         timeout 110 $B" \
      "cd scripts/gpu && timeout 160 python3 channel_profile.py --no-checks \
         --no-fla --seqs=16384 '--configs=(default),c32 early'"
    ;;
  deltacand)
    bash $S \
      "timeout 250 $PYTEST tests/test_linear_delta_pallas.py -k \
         'gpu_delta_kernel_configs and (output_scores-bf or \
         output_scores_fused-bf or prefetch-bf)'" \
      "ATTNJAX_DELTA_CONFIG='{\"output_scores\": true, \
         \"prefetch_weights\": true}' timeout 300 python3 -m \
         attnjax.bench.linear --variants delta,gated_delta --impls pallas \
         --no-softmax --seqs 4096,16384,32768"
    ;;
  oscores)
    bash $S \
      "cd scripts/gpu && timeout 140 python3 delta_profile.py --no-checks \
         --no-fla --seqs=4096 --output-scores" \
      "cd scripts/gpu && timeout 140 python3 delta_profile.py --no-checks \
         --no-fla --seqs=32768 --output-scores" \
      "timeout 240 $PYTEST tests/test_linear_delta_pallas.py -k \
         'gpu_delta_kernel_configs and output_scores'"
    ;;
  pftests)
    bash $S \
      "timeout 250 $PYTEST tests/test_linear_delta_pallas.py -k \
         'gpu_delta_kernel_configs and prefetch'" \
      "timeout 100 $PYTEST tests/test_linear_pallas.py -k prefetch" \
      "timeout 180 $PYTEST tests/test_linear_channel.py -k \
         'gpu_channel_direct and early'"
    ;;
  prefetch)
    bash $S \
      "cd scripts/gpu && timeout 160 python3 delta_profile.py --no-checks \
         --no-fla --seqs=32768 --prefetch" \
      "cd scripts/gpu && timeout 140 python3 delta_profile.py --no-checks \
         --no-fla --seqs=4096 --prefetch" \
      "timeout 240 $PYTEST tests/test_linear_delta_pallas.py -k \
         'gpu_delta_kernel_configs and prefetch'"
    ;;
  prefetch2)
    B="python3 -m attnjax.bench.linear --variants fixed_decay,scalar_gate \
       --impls pallas --no-fla --no-softmax --seqs 4096,16384"
    bash $S \
      "timeout 220 $B" \
      "ATTNJAX_LINEAR_SCAN_CONFIG='{\"prefetch_weights\": true}' \
         timeout 220 $B" \
      "timeout 120 $PYTEST tests/test_linear_pallas.py -k prefetch"
    ;;
  prefetch3)
    bash $S \
      "cd scripts/gpu && timeout 200 python3 channel_profile.py --no-checks \
         --no-fla --seqs=16384 '--configs=(default),c32 early'" \
      "cd scripts/gpu && timeout 200 python3 channel_profile.py --no-checks \
         --no-fla --seqs=32768 '--configs=A: sep'" \
      "timeout 150 $PYTEST tests/test_linear_channel.py -k \
         'gpu_channel_direct and early'"
    ;;
  call1)
    bash $S \
      "timeout 400 $PYTEST tests/test_linear_channel.py \
         tests/test_linear_delta_pallas.py -k '(gpu_channel_direct and \
         (split32 or fsplit32 or rows32 or xla_sums32 or parallel32)) or \
         channel_long or h128 or batch_one or (gpu_delta_kernel_configs and \
         (default or ut_cols64 or ieee))'"
    ;;
  mosaic)
    # The fused backward and three-consumer GPU tests passed in run39
    # (H100, after the race fix): timings only.
    bash $S \
      "$(mc_time 230) \
         --configs 64:4096:full:mha,64:4096:causal:mha,\
64:16384:full:mha,64:1024:full:mha --variants ours,wg3,wg3kv64" \
      "$(mc_time 330) \
         --configs '128:16384:*:*,128:4096:*:*,128:1024:*:*'"
    ;;
  call2)
    bash $S \
      "cd scripts/gpu && timeout 330 python3 channel_profile.py --no-checks \
         --kernels --no-fla --seqs=65536 \
         '--configs=(default),u4 split4,fsplit16,rows fsplit16'" \
      "cd scripts/gpu && timeout 200 python3 channel_profile.py --no-checks \
         --no-fla --seqs=4096 '--configs=(default),rows'"
    ;;
  call3)
    bash $S \
      "cd scripts/gpu && timeout 160 python3 delta_profile.py --no-checks \
         --no-fla --seqs=4096 --grad-sweep"
    ;;
  lpt)
    # BwdConfig.lpt_schedule: the persistent backward grids' items list-
    # scheduled heaviest first over all heads instead of head by head,
    # which for causal GQA 4:1 at 4k leaves the longest CTA 27% over the
    # bound (2% with it; test_lpt_work_table). Where the persistent dK/dV
    # kernel lost (masked GQA, run94 / run96): its GPU tests, then both
    # kernels persistent with and without it, and the dQ kernel alone with
    # it, beside the default (the dQ kernel alone, head by head).
    mosaic_tests_then_time persistent_dkv 400 \
      128:4096:causal:gqa,128:16384:causal:gqa,128:1024:causal:gqa,256:1024:causal:gqa,128:4096:causal:mha \
      ours,pbwd,pbwdlpt,pdqlpt
    ;;
  wg3at4k)
    # H = 64's three-consumer forward (FA3's 192-row tile; the default
    # from T = 16k, WG3_MIN_LEN) at T = 4k full, MHA and GQA 4:1, beside
    # the two-consumer default: run43 had 419 / 413 there, before the
    # step forms of run77 made both faster; the row is at 0.91 / 0.95.
    bash $S \
      "$(mc_time 150) --configs '64:4096:full:*' --variants ours,wg3"
    ;;
  deltarows)
    # The delta rule's rows of the H100 report at T = 16k and 32k beside
    # fla's chunk_delta_rule in one process, with the reverse sweep's
    # wider value blocks (the ungated default since run98: 8.00 -> 8.27
    # and 7.22 -> 7.77 M tokens/s forward+backward, fla 8.27 / 7.65 in
    # run90's process); merge with --from-rows.
    bash $S \
      "timeout 500 python3 -m attnjax.bench.linear --variants delta \
         --impls pallas --seqs 16384,32768 --no-softmax"
    ;;
  call4)
    # The delta and gated delta rows of the H100 report (run41/run43's)
    # beside fla and causal softmax at 32k; the GLA rows ran as run81
    # (glarows).
    bash $S \
      "timeout 560 python3 -m attnjax.bench.linear --variants \
         delta,gated_delta --impls pallas --softmax-seqs 32768"
    ;;
  gram)
    # Since 2026-12-06 the scalar-gate kernels' Gram pass skips the split
    # whose sum no chain reads (the forward's last, the backward's first):
    # half the pass at 2 splits (T = 16k, B = 4), 1/8 at 8 (64k, B = 1).
    # Their GPU tests, then call5's rows (4k-64k beside fla).
    bash $S \
      "timeout 150 $PYTEST tests/test_linear_pallas.py" \
      "timeout 420 python3 -m attnjax.bench.linear --variants \
         no_decay,fixed_decay,scalar_gate --impls pallas \
         --seqs 4096,16384,32768,65536 --softmax-seqs 32768"
    ;;
  call5)
    # The scalar-gate family's rows of the H100 linear report at all four
    # T (the report has no fixed_decay / scalar_gate row at 32k, where the
    # 10x-over-softmax goal is measured; its other rows are run10's).
    bash $S \
      "timeout 560 python3 -m attnjax.bench.linear --variants \
         no_decay,fixed_decay,scalar_gate --impls pallas \
         --seqs 4096,16384,32768,65536 --softmax-seqs 32768"
    ;;
  *)
    echo "usage: bash scripts/gpu/pending.sh overlap|utblock|glarows|tf32|packed|gatedparts|gatedknobs2|linpacked|wg3causal8kdefault|deltatests|recheck|fwdrows|fusedwhy|first|stages|waits|layouts|reduce|grid|grid2|mosaictests|mosaictests2|short|splits|profile|gap64k|utsweep|pftimes|deltacand|oscores|pftests|prefetch|prefetch2|prefetch3|call1|mosaic|call2|call3|call4|gram|call5" >&2
    exit 2
    ;;
esac
