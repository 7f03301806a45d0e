#!/usr/bin/env bash
# The benchmarks worth an accelerator's few minutes, in one command under a wall-clock budget: each
# step gets what is left of it, and its log lands in OUT whatever happens to the others.
#
#   bash bench/gpu_session.sh OUT [SECONDS] [STEP ...]
#
# Steps (default: hessian hessian_batches suite): hessian, hessian_batches, clip_loss, luq_overhead,
# lapq_tables (the MNIST method table at W3A3 and W2A4 in one file; needs MNIST_DIR, a local parquet
# copy), suite (pytest, a worker per 2 CPU cores). Where pip cannot reach PyPI, PyHessian (pure
# Python) travels as a copy of its package folder on PYTHONPATH; without it the Hessian benches
# time ours only. Local data are read with pyarrow when `datasets` is not installed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash bench/gpu_session.sh OUT [SECONDS] [STEP ...]}
BUDGET=${2:-540}
shift $(( $# < 2 ? $# : 2 ))
if [ $# -gt 0 ]; then STEPS=("$@"); else STEPS=(hessian hessian_batches suite); fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
left() { echo $(( BUDGET - SECONDS - 10 )); }

{ date -u; nvidia-smi -L 2>/dev/null; "$PYTHON" -c "import jax; print('jax', jax.__version__, jax.devices())"; } \
    2>&1 | tee "$OUT/environment.txt"
for step in "${STEPS[@]}"; do
    if [ "$(left)" -le 20 ]; then echo "$step: skipped, budget spent" | tee -a "$OUT/environment.txt"; continue; fi
    case $step in
        hessian) cmd=("$PYTHON" bench/hessian.py) ;;
        hessian_batches) cmd=("$PYTHON" bench/hessian_batches.py) ;;
        clip_loss) cmd=("$PYTHON" bench/clip_loss.py --precision highest) ;;
        luq_overhead) cmd=("$PYTHON" bench/luq_overhead.py --rounds 3) ;;
        lapq_tables) cmd=("$PYTHON" bench/lapq.py --table --bits 3,3 2,4 --seeds 3 --maxiter 1 --p-points 5
                          --out lapq_mnist_gpu --data-dir "${MNIST_DIR:?MNIST_DIR}"
                          --network results/networks/cifarresnet-8888f8fd66902a057f7b) ;;
        # pyproject's --maxprocesses=4 suits a laptop; a GPU machine's cores take more workers
        suite) cmd=("$PYTHON" -m pytest -o addopts="" -q --dist loadfile
                    -n "$(( $(nproc) / 2 > 1 ? $(nproc) / 2 : 1 ))") ;;
        *) echo "unknown step $step (allowed: hessian hessian_batches clip_loss luq_overhead lapq_tables suite)" >&2
           exit 2 ;;
    esac
    timeout "$(left)" "${cmd[@]}" > "$OUT/$step.txt" 2>&1
    echo "$step: exit $? at ${SECONDS} s" | tee -a "$OUT/environment.txt"
done
cp results/lapq_mnist_gpu.* "$OUT"/ 2>/dev/null  # the table's files (and unfinished settings' stores)
exit 0
