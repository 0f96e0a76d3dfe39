#!/usr/bin/env bash
# On a machine with a CUDA GPU, in one short go (under 5 minutes): the GPU tests, then lmtrain's layers
# against cuDNN's and the sampling speed, the tables written to docs/benchmarks-gpu.md.
#     scripts/gpu_check.sh            (from a checkout with lmtrain installed: pip install -e ".[dev]")
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
pytest -q tests/test_cuda.py tests/test_gemm.py tests/test_backprop.py
python scripts/bench_cells.py --device cuda --repeats 9 --doc docs/benchmarks-gpu.md \
  --sizes "[[32, 64, 128], [64, 128, 256], [64, 128, 512], [1, 256, 512], [64, 128, 1024]]"
python scripts/bench_sampling.py --device cuda --doc docs/benchmarks-gpu.md
