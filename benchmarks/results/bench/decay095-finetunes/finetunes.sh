#!/usr/bin/env bash
# The flagship's eight fine-tunes at second-moment decay 0.95, two lanes on the two cores (session 28).
set -uo pipefail
cd /work/main
source /work/venv/bin/activate
export PYTHONPATH=$PWD LEARNED_OPTIM_CACHE=$PWD/.cache_kernels
O=/work/runs/s28/ft095
B2=(--set net.config.second_moment_decay=0.95)
ft() {  # ft NAME CONFIG [ARGS...]: skipped when done, resumed when a checkpoint exists
    local name=$1 config=$2; shift 2
    if [[ -f $O/$name/model/model.safetensors ]]; then return; fi
    local resume=(); if [[ -d $O/$name/checkpoint ]]; then resume=(--resume); fi
    python -m learned_optim.meta train "$config" --out "$O/$name" --no-progress "${resume[@]}" "$@" "${B2[@]}" > "$O/$name.log" 2>&1
}
lane_a() {
    ft entropy adafac-mlp-adam-magnitude-tbv-nomup-entropy --set 'regularizers=[{kind: local_entropy, weight: 70000.0, where: posterior, every: 2, gamma: 0.0001, steps: 20, lr: 0.1, noise: 0.0001, ema: 0.25}]'
    ft sam-s1 adafac-mlp-adam-magnitude-tbv-nomup-sam --set seed=1
    ft gsam-s1 adafac-mlp-adam-magnitude-tbv-nomup-gsam --set seed=1
    ft control adafac-mlp-adam-magnitude-tbv-nomup-control
}
lane_b() {
    ft sam-w1 adafac-mlp-adam-magnitude-tbv-nomup-sam --set 'regularizers=[{kind: sam, weight: 1.0, where: segment_end, rho: 0.05}]'
    ft gsam adafac-mlp-adam-magnitude-tbv-nomup-gsam --set 'regularizers=[{kind: gsam, weight: 3.0, where: segment_end, rho: 0.05, alpha: 0.4}]'
    ft control-s1 adafac-mlp-adam-magnitude-tbv-nomup-control --set seed=1
    ft entropy-s1 adafac-mlp-adam-magnitude-tbv-nomup-entropy --set seed=1
}
lane_a & lane_b & wait
echo done
