#!/usr/bin/env bash
# The exported accelerate job on one GPU against our own engine on the same model and data (issue 20's one-GPU
# part). Builds a Qwen3-0.6B-shaped random model (as Llama, bf16), a small chat corpus, exports the job, runs it
# with accelerate's launcher (bf16 and fp32), then `lora-lab train` on the WGSL backend; prints each run's last step
# (tokens/s) as JSON lines. Usage (GPU machine, from the project root): bash bench/job_one_gpu.sh [OUT_DIR]
set -euo pipefail
out=${1:-/tmp/job-bench}
mkdir -p "$out"
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM
from bench.memory_plan import spec_of
from bench.tiny_models import make_tokenizer
from bench.train_throughput import hf_config
out = Path(sys.argv[1])
make_tokenizer(out / "model")
with torch.device("cuda"):
    model = AutoModelForCausalLM.from_config(hf_config(spec_of("Qwen3-0.6B")), dtype=torch.bfloat16)
model.save_pretrained(out / "model")
records = [{"messages": [{"role": "user", "content": f"What is fact number {i}?"},
                         {"role": "assistant", "content": f"Fact {i} is that the sky over town {i} is blue. " * 12}]}
           for i in range(400)]
(out / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
PY
common=(--model "$out/model" --data "$out/chats.jsonl" --seq-len 512 --batch-size 8 --steps 12 --lr 1e-4)
python3 -m engine export-job "${common[@]}" --out "$out/job" >/dev/null
(cd "$out/job" && python3 -m accelerate.commands.launch --config_file accelerate/single_gpu.yaml train.py --bf16 --output "$out/job-bf16" \
   >"$out/job-bf16.txt" 2>&1 && tail -n 2 "$out/job-bf16/log.jsonl" | head -n 1 | sed 's/^/{"run": "job bf16", "last": /; s/$/}/')
(cd "$out/job" && python3 -m accelerate.commands.launch --config_file accelerate/single_gpu.yaml train.py --output "$out/job-fp32" \
   >"$out/job-fp32.txt" 2>&1 && tail -n 2 "$out/job-fp32/log.jsonl" | head -n 1 | sed 's/^/{"run": "job fp32", "last": /; s/$/}/')
python3 -m engine train "${common[@]}" --out "$out/ours" --backend wgpu --weights bf16 --recompute off --json \
   2>"$out/ours.txt" | grep '"event": "step"' | tail -n 1 | sed 's/^/{"run": "ours wgsl bf16", "last": /; s/$/}/'
