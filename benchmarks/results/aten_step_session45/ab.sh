#!/bin/bash
# usage: ab.sh NAME CASE... ; alternates base, new, new, base, base, new per case
source /work/venv/bin/activate
export LEARNED_OPTIM_KERNELS=0 LEARNED_OPTIM_CACHE=/work/main/.cache_kernels
name=$1; shift
for c in "$@"; do
  for tree in base main main base base main; do
    root=/work/main; [ $tree = base ] && root=/work/s45/base
    ms=$(cd $root && PYTHONPATH=$root python /work/s45/case.py "$c" "$name" | python -c "import json,sys; print(json.loads(sys.stdin.read())['ms'])")
    echo "$c $tree $ms"
  done
done
