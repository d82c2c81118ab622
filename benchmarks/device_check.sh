#!/usr/bin/env bash
# The GPU checks of the project in one script (issue 14 "GPU", issue 15 "--device cuda"), sized to run in
# about 6 minutes on one GPU machine:
#
#   bash benchmarks/device_check.sh OUTDIR            # DEVICE=cuda by default; DEVICE=cpu QUICK=1 to dry-run
#
# 1. the machine: nvidia-smi, torch, the CPU;
# 2. every test that needs CUDA (the ones skipped on a CPU machine), then the whole suite with a GPU present;
# 3. benchmarks/step_time.py and benchmarks/train_step.py on the device (synchronised wall time, Adam side by side), and
#    the flagship's speed-up in time there (benchmarks/suite_iteration_time.py --speedups);
# 4. a short meta-training of the flagship's family on the device against the same on one CPU thread (seconds per
#    meta-step from each run's log), an interrupted run resumed with --resume, and one meta-epoch each of the
#    SAM, top-eigenvalue and local-entropy (the flagship's) fine-tunes (double backward, Hessian-vector products
#    and the entropy inner loop on the device).
#
# Each stage has its own time limit and writes OUTDIR/<stage>.log, so one stage failing costs only itself;
# OUTDIR/summary.log collects each stage's exit status, time and last lines. It runs from a checkout without
# installing (PYTHONPATH), under the machine's own torch; the baseline tests need pytorch-optimizer installed.
set -u
out=${1:?usage: device_check.sh OUTDIR}
mkdir -p "$out"
dev=${DEVICE:-cuda}
quick=${QUICK:-0}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export LEARNED_OPTIM_CACHE=${LEARNED_OPTIM_CACHE:-/tmp/learned_optim_kernels}
runs=$(mktemp -d)

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "== $name: $*" | tee -a "$out/summary.log"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "   rc $rc in $((SECONDS - t0)) s" | tee -a "$out/summary.log"
  tail -n 4 "$out/$name.log" | sed 's/^/   | /' | tee -a "$out/summary.log"
}

{
  date -u
  nvidia-smi 2>&1 | head -15
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
  lscpu | grep -E 'Model name|^CPU\(s\)'
  lscpu | grep Flags | tr ' ' '\n' | grep -E '^(avx|fma)' | tr '\n' ' '
  echo
} >"$out/machine.log" 2>&1
cat "$out/machine.log"

if [ "$quick" = 1 ]; then
  sizes=(100k) meta_epochs=2 families=(adafac_mlp)
else
  sizes=(1M 10M) meta_epochs=3 families=(dm_lstm rnnprop mlp adafac_mlp)
fi

stage cuda_tests 240 python3 -m pytest -q -p no:cacheprovider -rs -k "cuda" tests
stage step_time 180 python3 benchmarks/step_time.py --device "$dev" --sizes "${sizes[@]}" --families "${families[@]}" \
  --repeats 5 --no-compile --json "$out/step_time.json"
stage step_time_compiled 180 python3 benchmarks/step_time.py --device "$dev" --sizes "${sizes[@]}" --families mlp adafac_mlp \
  --repeats 5
stage train_step 240 python3 benchmarks/train_step.py --device "$dev" --models cnn5k transformer mlp1m resnet18 \
  --families "${families[@]}" --no-compile --overhead --repeats 5
# the flagship's speed-up in time on the device: its suite step speed-ups over the iteration ratios measured there
stage time_speedup 120 python3 benchmarks/suite_iteration_time.py --device "$dev" \
  --optimizer pretrained/adafac-mlp-adam-magnitude-tbv-nomup-soup-all8-orthogonal --tasks diabetes-mlp shapes-cnn \
  copy-gru digits-resnet-bn stdlib-gru-lm stdlib-transformer-lm stdlib-transformer-lm-2m \
  --speedups benchmarks/results/bench/step-in-place/suite/results.json \
  --contender adafac-mlp-adam-magnitude-tbv-nomup-soup-all8-orthogonal-session42-code\ [adamw]

flagship=adafac-mlp-adam-magnitude-tbv-nomup
meta() {  # meta STAGE DEVICE RUN-FOLDER [more arguments]: a short meta-training run, its log copied out
  local name=$1 d=$2 folder=$3
  shift 3
  stage "$name" 300 python3 -m learned_optim.meta train "$@" --device "$d" --out "$runs/$folder" \
    --set checkpoint_every=1 --no-progress
  cp "$runs/$folder/log.jsonl" "$out/$name.jsonl" 2>/dev/null
}
meta "meta_$dev" "$dev" "meta-$dev" $flagship --set meta_epochs=$meta_epochs
[ "$dev" = cpu ] || meta meta_cpu cpu meta-cpu $flagship --set meta_epochs=$meta_epochs
# the same run killed (SIGKILL) as soon as its first checkpoint is written, then resumed: it must end where the
# uninterrupted run above ended (bit for bit on CPU; to the device's rounding on a GPU)
python3 -m learned_optim.meta train $flagship --device "$dev" --out "$runs/resume" --set meta_epochs=$meta_epochs \
  --set checkpoint_every=1 --no-progress >"$out/meta_killed.log" 2>&1 &
pid=$!
for _ in $(seq 600); do
  compgen -G "$runs/resume/checkpoint/state-*.json" >/dev/null && break
  sleep 0.5
done
kill -9 $pid 2>/dev/null
wait $pid 2>/dev/null
echo "== meta_killed: killed with checkpoints $(ls "$runs/resume/checkpoint" 2>/dev/null | grep '^state-' | tr '\n' ' ')" |
  tee -a "$out/summary.log"
meta meta_resumed "$dev" resume $flagship --set meta_epochs=$meta_epochs --resume
python3 - "$out"/meta_*.jsonl <<'PY' 2>&1 | tee -a "$out/summary.log"
import json, statistics, sys
for path in sys.argv[1:]:
    steps = [e for e in map(json.loads, open(path)) if e.get("event") == "meta_step"]
    if steps:
        last = steps[-1]
        print(f"   {path.rsplit('/', 1)[-1]}: {len(steps)} meta-steps logged, median {statistics.median(e['seconds'] for e in steps):.3f} s each; "
              f"last (meta-step {last['meta_step']}): meta_loss {last['meta_loss']!r} grad_norm {last['grad_norm']!r}")
PY
for variant in sam hessian-ev entropy; do
  meta "meta_$variant" "$dev" "$variant" "$flagship-$variant" --set meta_epochs=1
done
# the whole suite with a GPU present, in whatever time is left of a 9-minute budget
left=$((540 - SECONDS))
if [ "$quick" = 1 ] || [ $left -lt 60 ]; then
  echo "== full_suite: skipped ($left s left)" | tee -a "$out/summary.log"
else
  stage full_suite $left python3 -m pytest -q -p no:cacheprovider -n 8 tests
fi
rm -rf "$runs"
