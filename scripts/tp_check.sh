#!/usr/bin/env bash
# Several GPUs (issue #7), on one N-GPU machine:
#   bash scripts/tp_check.sh OUT_DIR [tests] [greedy] [bench]      (no stage named: all three)
# tests:  the parallel tests (gloo, CPU processes) and the single-GPU engine tests
# greedy: the same greedy tokens at TP N as at TP 1 (torchrun), fp32, on the tiny checkpoint (FP8 linear layers
#         kept where a shard is whole 128-blocks) and on DeepSeek-V3 widths truncated to 4 layers (random weights:
#         every rank draws the single-GPU model's tensors and keeps its shard)
# bench:  the decode step of DeepSeek-V3 widths truncated to 3 dense + 1 MoE layer (256 experts), bf16, triton +
#         persistent metadata, CUDA graphs (NCCL all-reduces captured), at TP 1/2/4/8 up to N, both MoE layouts;
#         tokens/s and scaling efficiency = tokens/s at TP n / (n x tokens/s at TP 1).
# N: all visible GPUs (TP_GPUS=n to use fewer).
set -uo pipefail
out=${1:?usage: scripts/tp_check.sh OUT_DIR [tests] [greedy] [bench]}
shift
stages=${*:-tests greedy bench}
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
n=${TP_GPUS:-$(nvidia-smi -L | wc -l)}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
stage() { [[ " $stages " == *" $1 "* ]]; }
tprun() { local tp=$1; shift; torchrun --standalone --nproc-per-node "$tp" -m mla_runner "$@" progress=false; }
sizes=$(for tp in 1 2 4 8; do [ "$tp" -le "$n" ] && echo "$tp"; done)

stage tests && python -m pytest -q -rs tests/models/test_parallel.py tests/runner/engine/test_parallel_gloo.py \
  tests/runner/engine/test_engine_gpu.py 2>&1 | tee "$out/tests.log" | tail -n 5

if stage greedy; then
  python -c "import json; [print(json.dumps({'prompt_token_ids': [(7 * i + 3 * j) % 500 + 2 for j in range(n)]}))
             for i, n in enumerate((1, 9, 40, 200))]" > "$out/prompts.jsonl"
  for spec in "tiny model=tiny_deepseek_v3" \
              "dsv3_4l model=deepseek_v3 model.random_weights=true model.num_layers=4"; do
    name=${spec%% *}
    for tp in 1 "$n"; do
      tprun "$tp" ${spec#* } dtype=float32 attention=triton task.prompts="$out/prompts.jsonl" task.max_tokens=16 \
        hydra.run.dir="$out/greedy_${name}_tp$tp" 2>&1 | tail -n 1
    done
    python - "$out/greedy_${name}_tp1" "$out/greedy_${name}_tp$n" "$name" "$n" <<'EOF'
import json, sys
a, b = ([json.loads(l)["token_ids"] for l in open(f"{d}/completions.jsonl")] for d in sys.argv[1:3])
same = sum(x == y for x, y in zip(a, b))
print(f"greedy {sys.argv[3]}: TP {sys.argv[4]} vs TP 1: {same}/{len(a)} prompts with identical tokens",
      "OK" if same == len(a) and a else "MISMATCH")
EOF
  done 2>&1 | tee "$out/greedy.log"
fi

if stage bench; then
  for tp in $sizes; do
    tprun "$tp" -m hydra.sweep.dir="$out/bench_tp$tp" task=bench task.mode=decode model=deepseek_v3 \
      model.random_weights=true model.num_layers=4 attention=triton metadata=persistent parallel.moe=ep,tp \
      task.batch=1,64 task.context=4096 2>&1 | grep -E "^backend=|error" | tail -n 4
  done
  python - "$out" $sizes <<'EOF' | tee "$out/bench.md"
import json, pathlib, sys
root, sizes = pathlib.Path(sys.argv[1]), [int(s) for s in sys.argv[2:]]
rows = {}
for tp in sizes:
    for f in sorted((root / f"bench_tp{tp}").glob("*/result.json")):
        r = json.loads(f.read_text())
        if r["status"] == "ok":
            m = r["metrics"]
            rows[(m["moe"], m["batch"], tp)] = m
print("| moe | batch | TP | step (ms) | tokens/s | speedup | scaling efficiency | of roofline |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for (moe, batch, tp), m in sorted(rows.items()):
    base = rows.get((moe, batch, 1))
    speedup = m["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
    print(f"| {moe} | {batch} | {tp} | {m['step_ms']:.2f} | {m['tokens_per_s']:.0f} | {speedup:.2f} | "
          f"{speedup / tp:.0%} | {m['roofline_fraction']:.0%} |")
EOF
fi
