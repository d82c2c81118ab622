#!/usr/bin/env bash
# A/B: meta-step time of the parent (PES) and a TBPTT fine-tune (control), before (dcf0d180) and after (HEAD) the
# one-swap-per-step apply_rule, interleaved, 1 thread each, one process at a time; then the nets compared bit for bit.
source /work/venv/bin/activate
export LEARNED_OPTIM_CACHE=/work/main/.cache_kernels
declare -A tree=([old]=/work/s38/old [new]=/work/main)
for cfg in adafac-mlp-adam-magnitude-tbv-nomup adafac-mlp-adam-magnitude-tbv-nomup-control; do
  for rep in 1 2; do
    for v in old new; do
      rm -rf /tmp/s38/ab-$v; mkdir -p /tmp/s38/ab-$v
      (cd /work/main && PYTHONPATH=${tree[$v]} python /tmp/s38/steps.py $cfg /tmp/s38/ab-$v 10) | sed "s/^/$cfg $v rep$rep /"
    done
    python -c "
from safetensors.torch import load_file
import torch
a=load_file('/tmp/s38/ab-old/w.safetensors'); b=load_file('/tmp/s38/ab-new/w.safetensors')
print('  bit-identical', all(torch.equal(a[k],b[k]) for k in a))"
  done
done
