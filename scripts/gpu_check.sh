#!/usr/bin/env bash
# The GPU checks and the benchmarks behind the README's tables, in one command on a CUDA machine:
#   bash scripts/gpu_check.sh OUT_DIR [tests] [decode] [kernel] [speculative] [chunked] [benchmarks]
#   (no stage named: the first three)
# The GPU tests (marked gpu; they skip on a CPU), then the sweeps; each sweep writes summary.md / summary.csv / plots.
# speculative: MTP decoding at DeepSeek-V3's depth (61 layers over 3 dense + 1 MoE layer's weights, model.depth) at
# forced acceptance, beside no speculation; the attention at q_len 1-4 beside FlashMLA (docs/speculative.md).
# chunked: decodes under a 32k-token prompt with steps with chunks as piecewise graphs and eager, and offline
# throughput (docs/scheduling.md).
# benchmarks (only when named; several minutes): the scripts of benchmarks/ (benchmarks/README.md), their tables in
# OUT_DIR/bench_*.md (the MLA decode grid's: bench_mla_decode.txt, its JSON: mla_decode.json).
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUT_DIR [tests] [decode] [kernel] [benchmarks]}
shift
stages=${*:-tests decode kernel}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
stage() { [[ " $stages " == *" $1 "* ]]; }

stage tests && python -m pytest -q -rs -m gpu tests 2>&1 | tee "$out/gpu_tests.log" | tail -n 15

model="model=deepseek_v3 model.random_weights=true"
if stage decode; then
# The whole decode step of DeepSeek-V3 / Kimi-K2 widths truncated to their dense layers plus one MoE layer, with
# our attention and FlashMLA's (where sgl-flash-mla is installed: its jobs fail and are recorded otherwise), bf16
# and FP8 weights.
python -m mla_runner -m hydra.sweep.dir="$out/decode_deepseek_v3" task=bench task.mode=decode $model model.num_layers=4 \
  attention=triton,flashmla metadata=persistent weights=auto,fp8 task.batch=1,64,128 task.context=1024,4096,16384 \
  progress=false 2>&1 | tail -n 2
python -m mla_runner -m hydra.sweep.dir="$out/decode_kimi_k2" task=bench task.mode=decode model=kimi_k2 \
  model.random_weights=true model.num_layers=2 attention=triton,flashmla metadata=persistent weights=auto,fp8 \
  task.batch=1,64 task.context=4096 progress=false 2>&1 | tail -n 2
python -m mla_runner -m hydra.sweep.dir="$out/decode_eager" task=bench task.mode=decode $model model.num_layers=4 \
  attention=triton metadata=persistent,per_step cuda_graphs=false task.batch=1,64 task.context=4096 \
  progress=false 2>&1 | tail -n 2
fi

# One layer's MLA decode: our Triton path with both metadata strategies beside FlashMLA.
if stage kernel; then
python -m mla_runner -m hydra.sweep.dir="$out/kernel" task=bench task.mode=kernel $model \
  attention=triton,flashmla metadata=persistent,per_step task.heads=64,128 task.batch=1,64,128 \
  task.context=4096,16384 progress=false 2>&1 | tail -n 2
python -m mla_runner -m hydra.sweep.dir="$out/metadata" +sweep=metadata_grid $model task.context=16384 \
  progress=false 2>&1 | tail -n 2
fi
if stage speculative; then
for spec in "speculative=none" \
    "speculative=mtp speculative.num_tokens=1 speculative.force_acceptance_length=1.8" \
    "speculative=mtp speculative.num_tokens=3 speculative.force_acceptance_length=2.5"; do
  for batch in 1 32; do  # one process a row: each holds its own model
    python -m mla_runner hydra.run.dir="$out/speculative/b${batch}_${spec//[ =.]/_}" task=bench task.mode=decode \
      $model model.num_layers=4 model.depth=61 weights=fp8 $spec task.batch=$batch task.context=4096 \
      progress=false 2>&1 | grep "mode=decode"
  done
done
python -m mla_runner -m hydra.sweep.dir="$out/verify_attention" task=bench task.mode=kernel $model \
  attention=triton,flashmla task.q_len=1,2,3,4 task.batch=1,32,128 task.context=4096 progress=false 2>&1 | tail -n 2
fi
if stage chunked; then
python benchmarks/bench_chunked_prefill.py --budgets 8192 --piecewise on,off --json "$out/chunked.json" \
  > "$out/chunked.md" 2>&1 || echo "bench_chunked_prefill failed: see $out/chunked.md"
python -m mla_runner -m hydra.sweep.dir="$out/throughput" task=bench task.mode=throughput $model \
  model.num_layers=4 weights=fp8,bf16 piecewise_cuda_graphs=true,false task.batch=64 task.context=2000 \
  task.output_len=64 max_batch_size=64 progress=false 2>&1 | tail -n 2
fi
# The benchmark scripts: one layer's MLA decode over the whole grid beside FlashMLA (the README's table), the fused
# MoE and its router, the FP8 GEMM, MLA's fused input projections.
if stage benchmarks; then
python benchmarks/bench_mla_decode.py --triton-too --layers 8 --out "$out/mla_decode.json" \
  > "$out/bench_mla_decode.txt" 2>&1 || echo "bench_mla_decode failed: see $out/bench_mla_decode.txt"
for cmd in "bench_fused_moe" "bench_fused_moe --routing" "bench_fp8_gemm" "bench_mla_proj"; do
  script=${cmd%% *} name=${cmd// --/_}
  python "benchmarks/$script.py" ${cmd#"$script"} > "$out/$name.md" 2>&1 || echo "$cmd failed: see $out/$name.md"
done
fi
for d in decode_deepseek_v3 decode_kimi_k2 decode_eager kernel metadata verify_attention throughput; do
  [ -f "$out/$d/summary.md" ] && { echo "== $d"; cat "$out/$d/summary.md"; }
done
