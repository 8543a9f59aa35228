#!/usr/bin/env bash
# The GPU checks and benchmarks behind the README's tables, in one command on a CUDA machine:
#   bash scripts/gpu_check.sh OUT_DIR [quick]
# GPU-only tests first (they skip on a CPU), then the decode and kernel sweeps; every sweep writes its
# summary.md / summary.csv / plots under OUT_DIR.
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUT_DIR [quick]}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"

python -m pytest -q -rs tests/test_engine_gpu.py tests/test_backends.py tests/test_kernels_gpu.py \
  tests/test_fused_moe.py "tests/test_e2e.py::test_batched_greedy_equals_transformers" 2>&1 | tee "$out/gpu_tests.log"

# End-to-end decode step of full-width models truncated to one MoE layer after the dense ones.
python -m runner -m hydra.sweep.dir="$out/decode" task=bench task.mode=decode model=deepseek_v3 \
  model.random_weights=true model.num_layers=4 attention=triton metadata=persistent \
  task.batch=1,16,64,128 task.context=1024,16384 progress=false 2>&1 | tail -n 3
python -m runner -m hydra.sweep.dir="$out/decode_baselines" task=bench task.mode=decode model=deepseek_v3 \
  model.random_weights=true model.num_layers=4 attention=triton metadata=persistent,per_step cuda_graphs=false \
  task.batch=1,64 task.context=4096 progress=false 2>&1 | tail -n 3

# One layer's MLA decode: our Triton path with both strategies beside FlashMLA (when flash_mla imports).
python -m runner -m hydra.sweep.dir="$out/kernel" task=bench task.mode=kernel model=deepseek_v3 \
  model.random_weights=true attention=triton,flashmla metadata=persistent,per_step task.heads=64,128 \
  task.batch=1,8,64,128 task.context=4096,16384 progress=false 2>&1 | tail -n 3
python -m runner -m hydra.sweep.dir="$out/metadata" +sweep=metadata_grid model=deepseek_v3 \
  model.random_weights=true task.context=16384 progress=false 2>&1 | tail -n 3
