#!/usr/bin/env bash
# The flagship adafac-mlp-adam-magnitude-tbv-nomup-soup-all8-orthogonal from scratch, in four stages, each resumable:
#   1. the parent adafac-mlp-adam-magnitude-tbv-nomup (PES on meta-mix; 1 h 26 min on one core), particle-parallel on
#      the 2 cores (torchrun --parallel particles: each process unrolls half of every truncation's PES particles; the
#      one-process run bit for bit, in less time; set PARENT_PROCESSES=1 for one process; PARENT_BATCHED=1 unrolls
#      each process's particles together, estimator.batch_particles: faster, but a run of its own, not the shipped
#      run's bits, benchmarks/results/batched-particles/);
#   2. eight TBPTT fine-tunes of that parent, two at a time (the 2 cores): no regularizer, SAM (weight 1), GSAM,
#      local entropy, each at meta-seeds 0 and 1 (62.7 min of single-core time for the shipped ones: ~31 min);
#   3. their uniform weight average (python -m learned_optim.meta soup; seconds): the flagship of sessions 16-32;
#   4. the soup fine-tuned with each matrix's direction orthogonalised (TBPTT, 1,000 meta-steps; 12 min on session
#      33's Intel Xeon), then its orthogonalisation's products set to bfloat16 where the hardware has the units
#      (python -m learned_optim.meta reconfigure ... --net newton_schulz_dtype=auto; session 34) and its
#      Newton-Schulz steps cut from 5 to 3 (--net newton_schulz_steps=3; session 35): two records, as the shipped one.
# With the parent on one process, stages 1-3 took about 2 h on the 2-core AMD EPYC and 100 min on session 29's Intel
# Xeon (run at decay 0.95, the same compute): with stage 4, about 2 h 10 min and 1 h 52 min. With the parent
# particle-parallel (session 38, the same AMD EPYC): 1 h 41 min 33 s in all (parent 46 min, fine-tunes 44 min,
# stage 4 11 min; benchmarks/results/bench/recipe-reproduction/). Rerun the same command after an interruption: a stage whose
# net exists is skipped, a run with a checkpoint resumes (--resume).
#
#   bash benchmarks/flagship_recipe.sh runs/flagship                      # the recipe
#   bash benchmarks/flagship_recipe.sh runs/smoke --set meta_epochs=1     # a smoke run (every stage, one trajectory)
#
# Extra arguments go to every `learned_optim.meta train` call.
set -euo pipefail
out=${1:?usage: flagship_recipe.sh OUT_DIR [--set KEY=VALUE ...]}
shift
prefix=adafac-mlp-adam-magnitude-tbv-nomup

parent_processes=${PARENT_PROCESSES:-2}
parent_options=()
if [[ ${PARENT_BATCHED:-0} == 1 ]]; then parent_options=(--set estimator.batch_particles=true); fi

train() {  # train CONFIG RUN_DIR [ARGS...]: skipped when the net exists, resumed when a checkpoint does
    local config=$1 run=$2
    shift 2
    if [[ -f $run/model/model.safetensors ]]; then return; fi
    local resume=()
    if [[ -d $run/checkpoint ]]; then resume=(--resume); fi
    "${launcher[@]}" -m learned_optim.meta train "$config" --out "$run" --no-progress "${resume[@]}" "$@"
}

launcher=(python)
if ((parent_processes > 1)); then
    launcher=(torchrun --standalone --nproc-per-node "$parent_processes")
    train "$prefix" "$out/parent" --parallel particles "${parent_options[@]}" "$@"
else
    train "$prefix" "$out/parent" "${parent_options[@]}" "$@"
fi
launcher=(python)
parent=$out/parent/model
ingredients=()
for kind in control sam gsam entropy; do
    pids=()
    for seed in 0 1; do
        run=$out/$kind-s$seed
        train "$prefix-$kind" "$run" --set "init_from=$parent" --set "seed=$seed" "$@" &
        pids+=($!)
        ingredients+=("$run/model")
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
done
python -m learned_optim.meta soup "${ingredients[@]}" --schedule cosine --name "$prefix-soup-all8" --out "$out/soup-all8"
train "$prefix-soup-all8-orthogonal" "$out/orthogonal" --set "init_from=$out/soup-all8" "$@"
reconfigure_once() {  # reconfigure_once FIELD VALUE JSON_VALUE: the flagship's net setting, unless already made
    local current
    current=$(python -c 'import json, sys; print(json.dumps(json.load(open(sys.argv[1]))["net"].get(sys.argv[2])))' \
        "$out/orthogonal/model/config.json" "$1")
    if [[ $current != "$3" ]]; then
        python -m learned_optim.meta reconfigure "$out/orthogonal/model" --net "$1=$2"
    fi
}
reconfigure_once newton_schulz_dtype auto '"auto"'
reconfigure_once newton_schulz_steps 3 3
