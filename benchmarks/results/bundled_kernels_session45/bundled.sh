#!/bin/bash
# The iteration time on suite models: ATen (kernels off), the bundled avx512 library (no compiler), a local build.
source /work/venv/bin/activate
cd /work/main
export PYTHONPATH=/work/main
T="diabetes-mlp shapes-cnn copy-gru addition-lstm stdlib-transformer-lm digits-resnet-bn"
O="--optimizer adafac-mlp-adam-magnitude-tbv-nomup-soup-all8-orthogonal --optimizer adafac-mlp-adam-magnitude-tbv-nomup-soup-all8"
for round in 1 2; do
  echo "## round $round: ATen (LEARNED_OPTIM_KERNELS=0)"
  LEARNED_OPTIM_KERNELS=0 LEARNED_OPTIM_CACHE=/work/main/.cache_kernels python benchmarks/suite_iteration_time.py $O --repeats 5 --tasks $T | grep "^|"
  echo "## round $round: no compiler, bundled kernels (CXX=/nonexistent/c++ LEARNED_OPTIM_PREBUILT=/tmp/pb)"
  CXX=/nonexistent/c++ LEARNED_OPTIM_PREBUILT=/tmp/pb LEARNED_OPTIM_CACHE=/tmp/pbcache python benchmarks/suite_iteration_time.py $O --repeats 5 --tasks $T | grep "^|"
  echo "## round $round: kernels compiled here (the default with a compiler)"
  LEARNED_OPTIM_CACHE=/work/main/.cache_kernels python benchmarks/suite_iteration_time.py $O --repeats 5 --tasks $T | grep "^|"
done
