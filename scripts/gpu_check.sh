#!/usr/bin/env bash
# On a machine with a CUDA GPU, in one short go (a few minutes): the GPU tests and the compiled kernels'
# error checks; a user's run on the GPU (the quickstart for a few hundred steps, in float32 and bfloat16,
# resumed, sampled and evaluated on the GPU and on the CPU); then lmtrain's layers against cuDNN's and the
# sampling speed, the tables written to docs/benchmarks-gpu.md. Every stage runs even if one before it
# failed; the exit status says whether all passed, and the last lines name the stages that failed.
#     scripts/gpu_check.sh [STEPS]     (from a checkout with lmtrain installed: pip install -e ".[dev]")
set -uo pipefail
cd "$(dirname "$0")/.."
steps=${1:-300}
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=()

stage() {  # stage NAME COMMAND...: run COMMAND, say how long it took, remember it if it failed
    local name=$1 begin=$SECONDS
    shift
    echo "=== $name"
    if "$@"; then
        echo "=== $name: passed in $((SECONDS - begin)) s"
    else
        echo "=== $name: FAILED (exit $?) in $((SECONDS - begin)) s"
        failed+=("$name")
    fi
}

lmtrain() { "$python" -m lmtrain "$@"; }

"$python" -c "import sys, torch; torch.cuda.is_available() or sys.exit('gpu_check.sh: no CUDA device here'); \
print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'CUDA', torch.version.cuda)" || exit 1

stage "CUDA tests" "$python" -m pytest -q -p no:cacheprovider tests/test_cuda.py
# The compiled kernels' checks raise RuntimeError, not crash the process (this machine's compiler with its torch).
stage "the kernels' errors" "$python" -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_loss.py \
    tests/test_precision.py -k "reject or out_of_range or mismatched"
run="$work/quickstart"
stage "quickstart on the GPU, $steps steps" lmtrain train --no-progress configs/quickstart.yaml \
    train.device=cuda "train.max_steps=$steps" train.eval_every=100 train.checkpoint_every=100 \
    train.final_samples=2 "train.out_dir=$run"
stage "resumed to $((steps + 100)) steps" lmtrain train --no-progress --resume configs/quickstart.yaml \
    train.device=cuda "train.max_steps=$((steps + 100))" train.eval_every=100 train.checkpoint_every=100 \
    train.final_samples=2 "train.out_dir=$run"
stage "sample on the GPU" lmtrain sample --checkpoint "$run/best.pt" --device cuda --num 3 --seed 0
stage "sample on the CPU" lmtrain sample --checkpoint "$run/best.pt" --device cpu --num 3 --seed 0
same_loss() {  # the test loss of one checkpoint on the GPU and on the CPU agree to float32's summing order
    local gpu cpu
    gpu=$(lmtrain eval perplexity --checkpoint "$run/best.pt" --device cuda --split test --json) || return 1
    cpu=$(lmtrain eval perplexity --checkpoint "$run/best.pt" --device cpu --split test --json) || return 1
    "$python" -c "import json, sys; g, c = (json.loads(a)['loss'] for a in sys.argv[1:]); \
print('loss', g, 'on the GPU,', c, 'on the CPU'); sys.exit(abs(g - c) > 1e-4 * abs(c))" "$gpu" "$cpu"
}
stage "perplexity on the GPU and on the CPU: the same loss" same_loss
stage "quickstart in bfloat16, 100 steps" lmtrain train --no-progress configs/quickstart.yaml \
    train.device=cuda train.precision=bfloat16 train.max_steps=100 train.eval_every=100 \
    train.final_samples=1 "train.out_dir=$work/bfloat16"
stage "layers against cuDNN" "$python" scripts/bench_cells.py --device cuda --repeats 9 \
    --cells rnn gru gru-lecture lstm --doc docs/benchmarks-gpu.md \
    --sizes "[[32, 64, 128], [64, 128, 256], [64, 128, 512], [1, 256, 512], [64, 128, 1024]]"
stage "sampling speed" "$python" scripts/bench_sampling.py --device cuda --doc docs/benchmarks-gpu.md

if ((${#failed[@]})); then
    printf '=== failed: %s\n' "${failed[@]}"
    exit 1
fi
echo "=== every stage passed"
