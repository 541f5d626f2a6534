#!/usr/bin/env bash
# The benchmarks of one lent-GPU session, in stages that each fit one 10-minute device call (PyTorch + PEFT is
# measured in the same process as ours by every script). Run from the project root on the GPU machine after
# `source .gpu/setup.sh`; results go to $OUT (or ./bench-out):
#   bash bench/h200_session.sh speed      # GEMM (f32, f16 weights, f16 math, tuned) and training tokens/s at model shapes
#   bash bench/h200_session.sh large      # what `speed` has no time for: Llama-3.2-3B at B=1 and 8 against PEFT
#   bash bench/h200_session.sh extra      # GEMM kernel variants (BK, DOUBLE, PREFETCH, FRAG, warp map, diagnostics);
#                                         # the Phi-4-mini shape against PEFT bf16
#   bash bench/h200_session.sh features   # teach_fact on the demo model, DPO/ORPO step, AdaLoRA step
#   bash bench/h200_session.sh arch       # Gemma 3 shapes and a per-phase step profile
#   bash bench/h200_session.sh short      # what a call of ~7 minutes holds: GEMM table, B=1 of the 1B+ shapes and
#                                         # the small shapes in the fastest configuration, then a 2-shape sweep
# The demo model (~94 MB, a PyPI wheel) is larger than one call may carry: `features` expects it at
# $LORA_LAB_HOME/models (see engine.model.references.pull_demo), put there by the caller.
set -uo pipefail
out=${OUT:-bench-out}
mkdir -p "$out"
case "${1:-}" in
  speed)
    timeout 80 python bench/matmul.py > "$out/matmul.json" 2> "$out/matmul.log"
    timeout 440 python bench/train_throughput.py --time-budget 400 --out "$out/train_throughput.jsonl" \
      > /dev/null 2> "$out/train_throughput.log"
    tail -n 1 "$out/train_throughput.jsonl" ;;
  large)
    timeout 540 python bench/train_throughput.py --models Llama-3.2-3B --ours bf16/f16 --time-budget 500 \
      --out "$out/train_throughput-3b.jsonl" > /dev/null 2> "$out/train_throughput-3b.log"
    tail -n 1 "$out/train_throughput-3b.jsonl" ;;
  extra)
    timeout 240 python bench/matmul.py --sweep 4 --no-torch > "$out/matmul-sweep.json" 2> "$out/matmul-sweep.log"
    timeout 280 python bench/architectures.py --models phi4-mini > "$out/architectures-phi4.json" 2> "$out/arch-phi4.log" ;;
  features)
    timeout 240 python -m bench.teach_fact > "$out/teach_fact.json" 2> "$out/teach_fact.log"; cat "$out/teach_fact.json"
    timeout 150 python bench/preference_step.py --backends wgpu --steps 5 --rounds 3 --batch-size 8 --seq-len 512 \
      > "$out/preference_step.json" 2> "$out/preference_step.log"
    timeout 120 python bench/adalora_step.py --backends wgpu --steps 5 --rounds 3 --batch-size 8 --seq-len 512 \
      > "$out/adalora_step.json" 2> "$out/adalora_step.log" ;;
  arch)
    timeout 150 python bench/architectures.py --models gemma3-270m > "$out/architectures-270m.json" 2> "$out/arch-270m.log"
    timeout 180 python bench/architectures.py --models gemma3-1b > "$out/architectures-1b.json" 2> "$out/arch-1b.log"
    timeout 170 python bench/step_profile.py --models Qwen3-0.6B Llama-3.2-1B --batch-sizes 1 8 --time-budget 130 \
      --out "$out/step_profile.jsonl" > /dev/null 2> "$out/step_profile.log" ;;
  short)
    timeout 80 python bench/matmul.py > "$out/matmul.json" 2> "$out/matmul.log"
    timeout 45 python bench/matmul.py --sweep 2 --no-torch > "$out/matmul-sweep.json" 2> "$out/matmul-sweep.log"
    timeout 120 python bench/train_throughput.py --models Llama-3.2-1B Qwen2.5-1.5B --batch-sizes 1 --ours bf16/f16 \
      --time-budget 100 --out "$out/train_throughput-1b-b1.jsonl" > /dev/null 2> "$out/train_throughput-1b-b1.log"
    timeout 100 python bench/train_throughput.py --models SmolLM2-135M Qwen3-0.6B --ours bf16/f16 --time-budget 85 \
      --out "$out/train_throughput-small.jsonl" > /dev/null 2> "$out/train_throughput-small.log" ;;
  *) echo "usage: bash bench/h200_session.sh speed|large|extra|features|arch|short" >&2; exit 2 ;;
esac
