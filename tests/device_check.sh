#!/usr/bin/env bash
# The GPU checks, in one run on a machine with one CUDA device (docs/gpu.md). Writes its logs
# under $OUT (default ./gpu-out). Needs torch with CUDA, transformers, megatron-core.
set -o pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD:$PWD/tests PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/env.txt"
python3 -c "import torch, transformers, megatron.core as m; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'megatron-core', m.__version__)" | tee -a "$OUT/env.txt"
timeout 240 python3 -m pytest -q -p no:randomly -p no:cacheprovider -rfEs --durations=8 \
    tests/test_gpu.py tests/infer/test_infer_gpu.py 2>&1 | tee "$OUT/tests.log"
tests=$?
timeout 110 python3 benchmarks/bench_infer.py --device cuda:0 --rows 500 --batch-size 32 \
    --max-new-tokens 64 2>&1 | tee "$OUT/bench_infer.md"
timeout 110 python3 benchmarks/bench_infer.py --device cuda:0 --rows 500 --batch-size 32 \
    --max-new-tokens 64 --hidden 1024 --layers 8 2>&1 | tee "$OUT/bench_infer_1024.md"
exit $tests
