#!/usr/bin/env bash
# waits for the recipe, soups it under its own name, runs stage 1 (seeds 96-101) for the candidate, then the table
set -euo pipefail
cd /work/main
source /work/venv/bin/activate
export PYTHONPATH=$PWD LEARNED_OPTIM_CACHE=$PWD/.cache_kernels
R=benchmarks/results/b2-095-recipe-runs
D=benchmarks/results/bench/decay095-from-scratch
while [ ! -f $R/soup-all8/model.safetensors ]; do sleep 20; done
date -u
python -m learned_optim.meta soup $R/{control,sam,gsam,entropy}-s{0,1}/model --schedule cosine \
    --name adafac-mlp-adam-magnitude-tbv-nomup-soup-all8-b2-095-recipe \
    --out $D/nets/soup-all8-b2-095-recipe
C=$D/nets/soup-all8-b2-095-recipe
A=select-stdlib-transformer-wide,select-shapes12-autoencoder,select-wine-mlp,select-classification-mlp
B=select-shapes24-cnn,select-stdlib-lstm-lm,select-copy-lstm
for t in A B; do
  tasks=${!t}
  python -m learned_optim bench --selection-set --baselines adamw --optimizer $C --lr-rule adamw --first-seed 96 --seeds 6 \
      --tasks $tasks --baseline-dir benchmarks/results/bench/selection-runs --out /work/runs/s29/stage1-$t --no-progress --no-plots \
      > /work/runs/s29/stage1-$t.log 2>&1 &
done
wait
cp -n /work/runs/s29/stage1-A/runs/* /work/runs/s29/stage1-B/runs/* benchmarks/results/bench/selection-runs/runs/
python -m learned_optim bench --selection-set --baselines adamw --optimizer pretrained/adafac-mlp-adam-magnitude-tbv-nomup-soup-all8 \
    --optimizer $C --lr-rule adamw --first-seed 96 --seeds 6 \
    --baseline-dir benchmarks/results/bench/selection-runs --out $D/stage1 --no-progress --no-plots > /work/runs/s29/stage1-table.log 2>&1
date -u
