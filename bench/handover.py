"""Measure the chat <-> training GPU handover for a SmolLM2-135M-shaped model; prints JSON.

    python bench/handover.py                       # CUDA if present, else MPS, else CPU
    python bench/handover.py --train-callable pkg.module:function
    python bench/handover.py --train-cmd "lora-lab train {model_dir} --out {adapter_dir} ..."

The model has SmolLM2-135M's shape (Llama, hidden 576, 30 layers, 9 heads / 3 KV heads, MLP 1536, vocab 49152,
tied embeddings) with random weights saved as bfloat16 like the published checkpoint: nothing is downloaded.
The tokenizer is the tests' small byte-level BPE (ids it does not know decode to nothing), which does not
change what is measured: load, unload and memory depend on the weights.

The training phase is pluggable. Without a hook it is a placeholder that trains nothing and hands back a
pre-made random LoRA adapter (r=16 on every projection): the JSON says so under "training". A
`--train-callable module:function` is called as function(model_dir: Path, adapter_dir: Path, ready:
Callable[[], None]) and should call ready() once its device and buffers exist, train on the model in
model_dir, save the adapter into adapter_dir and return it (or an object with .adapter_dir). A `--train-cmd`
runs in a subprocess ({model_dir} and {adapter_dir} are substituted).

Also measured once: decode speed of a sampled answer, how long a stop takes to end the stream mid-answer, and
until generation has let go of the model (the token in flight finishes first).
Figures per repeat: torch memory with chat loaded / during training / after reload, the time from the start
of the handover until training may start (unload), until the hook said ready, and from training done until
chat is ready (release + reload + new adapter active), plus the time to the first answer after the reload.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from engine.chat.generation import GenerationSettings  # noqa: E402
from engine.chat.handover import Handover, HandoverState  # noqa: E402
from engine.chat.inference import ChatEngine, best_device, torch_memory  # noqa: E402

SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5),
    # For a quick run of this script on a CPU-only machine.
    "small": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
                  num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=True,
                  max_position_embeddings=2048, rope_theta=100000.0, rms_norm_eps=1e-5),
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def build_model(shape: dict, out_dir: Path) -> int:
    """Save a random Llama of `shape` (bfloat16 safetensors + the test tokenizer); returns its parameter count."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.tiny_models import make_tokenizer

    tokenizer = make_tokenizer(out_dir)
    config = LlamaConfig(**shape, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    shapes.pop("lm_head.weight")  # tied to the embeddings
    gen = torch.Generator().manual_seed(0)
    tensors = {k: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    for k in tensors:
        if "norm" in k:
            tensors[k] = torch.ones_like(tensors[k])
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config.dtype = "bfloat16"
    config.save_pretrained(out_dir)
    return sum(t.numel() for t in tensors.values())


def build_adapter(model_dir: Path, out_dir: Path, r: int = 16) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(1)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=LORA_TARGETS, init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(out_dir)
    return out_dir


def nvml_used_bytes() -> int | None:
    """Device-wide used memory as the driver sees it (includes CUDA contexts and other processes)."""
    if not torch.cuda.is_available():
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        index = torch.cuda.current_device()
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).used)
    except Exception:  # no NVML (e.g. a non-NVIDIA build): the torch figures still stand
        return None


def memory(device: torch.device) -> dict:
    return {"torch": torch_memory(device), "nvml_used": nvml_used_bytes()}


def first_answer_seconds(chat: ChatEngine) -> tuple[float, int]:
    """Time to the end of a short greedy answer (includes the first kernels after a reload)."""
    started = time.perf_counter()
    stream = chat.stream_chat(PROMPT, GenerationSettings(max_new_tokens=8, temperature=0))
    for _ in stream:
        pass
    return time.perf_counter() - started, stream.tokens


def answer_speed_and_stop(chat: ChatEngine) -> dict:
    """Decode speed of a sampled answer, and the time from a stop request to the stream's end mid-answer."""
    settings = GenerationSettings(max_new_tokens=64, temperature=1.0, top_k=0, seed=0)
    started = time.perf_counter()
    stream = chat.stream_chat(PROMPT, settings)
    for _ in stream:
        pass
    decode_s = time.perf_counter() - started
    tokens = stream.tokens
    cancel = threading.Event()
    stream = chat.stream_chat(PROMPT, GenerationSettings(max_new_tokens=4096, temperature=1.0, top_k=0, seed=0),
                              cancel_event=cancel)
    while stream.tokens < 16:  # counted, not read: this tokenizer decodes most of the model's ids to nothing
        time.sleep(0.001)
    stopped = time.perf_counter()
    cancel.set()
    for _ in stream:
        pass
    stream_ended_s = time.perf_counter() - stopped
    stream.wait()
    return {"tokens": tokens, "tokens_per_s": tokens / decode_s, "stop_latency_s": stream_ended_s,
            "model_released_after_stop_s": time.perf_counter() - stopped,
            "tokens_before_stop_took_effect": stream.tokens}


def make_training(args, model_dir: Path, premade_adapter: Path, device: torch.device, marks: dict):
    """The blocking training callable for one repeat, and a description of what it is."""
    def ready():
        marks["ready"] = time.perf_counter()
        marks["memory_during_training"] = memory(device)

    if args.train_callable:
        module, _, name = args.train_callable.partition(":")
        function = getattr(importlib.import_module(module), name)

        def run():
            marks["run_started"] = time.perf_counter()
            out = Path(tempfile.mkdtemp(prefix="lora-lab-bench-adapter-"))
            result = function(model_dir, out, ready)
            marks.setdefault("memory_during_training", memory(device))
            return result
        return run, f"callable {args.train_callable}"

    if args.train_cmd:
        def run():
            marks["run_started"] = time.perf_counter()
            out = Path(tempfile.mkdtemp(prefix="lora-lab-bench-adapter-"))
            ready()  # the subprocess's own readiness is not visible from here
            command = args.train_cmd.format(model_dir=shlex.quote(str(model_dir)), adapter_dir=shlex.quote(str(out)))
            subprocess.run(command, shell=True, check=True)
            return out if (out / "adapter_config.json").is_file() else None
        return run, f"subprocess {args.train_cmd!r} (ready = when it was started)"

    def run():
        marks["run_started"] = time.perf_counter()
        ready()
        out = Path(tempfile.mkdtemp(prefix="lora-lab-bench-adapter-"))
        shutil.copytree(premade_adapter, out, dirs_exist_ok=True)  # a new folder, as a real run writes
        return out
    return run, "placeholder: no training ran; the handover returns a copy of a pre-made random LoRA adapter (r=16)"


def one_repeat(chat: ChatEngine, args, model_dir: Path, premade_adapter: Path) -> dict:
    # Every repeat starts from the same chat: the base with the "previous" adapter active.
    for name in chat.adapters:
        if name != "previous":
            chat.remove_adapter(name)
    chat.set_active_adapter("previous")
    handover = Handover(chat)
    marks: dict = {}
    run, training = make_training(args, model_dir, premade_adapter, chat.device, marks)
    loaded = memory(chat.device)
    started = time.perf_counter()
    asyncio.run(handover.train(run))
    handover.close()
    seconds = {t.previous: t.seconds for t in handover.history}
    after = memory(chat.device)
    answer_s, tokens = first_answer_seconds(chat)
    during = marks.get("memory_during_training")
    return {
        "training": training,
        "memory_chat_loaded": loaded,
        "memory_during_training": during,
        "torch_holds_none_during_training": None if during is None or during["torch"] is None
        else during["torch"]["allocated"] == 0 and during["torch"]["reserved"] == 0,
        "memory_after_reload": after,
        "unload_to_training_start_s": seconds[HandoverState.UNLOADING],
        "unload_to_training_ready_s": marks["ready"] - started if "ready" in marks else None,
        "training_done_to_chat_ready_s": seconds[HandoverState.RELOADING],
        "first_answer_after_reload_s": answer_s,
        "first_answer_tokens": tokens,
        "adapters_after": list(chat.adapters),
        "active_adapter_after": chat.active_adapter,
        "handover": [{"from": t.previous.value, "to": t.state.value, "seconds": t.seconds} for t in handover.history],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="auto | cuda | mps | cpu")
    parser.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    parser.add_argument("--repeats", type=int, default=3)
    hook = parser.add_mutually_exclusive_group()
    hook.add_argument("--train-callable",
                      help="module:function called as function(model_dir, adapter_dir, ready)")
    hook.add_argument("--train-cmd",
                      help="shell command run as the training phase; {model_dir} and {adapter_dir} substituted")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    device = best_device() if args.device == "auto" else torch.device(args.device)

    with tempfile.TemporaryDirectory(prefix="lora-lab-bench-") as tmp:
        model_dir, adapter_dir = Path(tmp) / "model", Path(tmp) / "adapter"
        params = build_model(SHAPES[args.shape], model_dir)
        build_adapter(model_dir, adapter_dir)
        chat = ChatEngine(device=device)
        started = time.perf_counter()
        chat.load(model_dir)
        cold_load_s = time.perf_counter() - started
        chat.set_active_adapter(chat.load_adapter(adapter_dir, name="previous"))
        first_answer_seconds(chat)  # warm up kernels so the first repeat is not penalised
        answer = answer_speed_and_stop(chat)
        repeats = [one_repeat(chat, args, model_dir, adapter_dir) for _ in range(args.repeats)]
        chat.unload()

    def median(key):
        values = [r[key] for r in repeats if r[key] is not None]
        return statistics.median(values) if values else None

    report = {
        "bench": "handover",
        "machine": {
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": importlib.import_module("transformers").__version__,
            "peft": importlib.import_module("peft").__version__,
        },
        "model": {"shape": args.shape, **SHAPES[args.shape], "parameters": params, "dtype": str(chat.dtype)},
        "cold_load_s": cold_load_s,
        "answer": answer,
        "median": {k: median(k) for k in ("unload_to_training_start_s", "unload_to_training_ready_s",
                                          "training_done_to_chat_ready_s", "first_answer_after_reload_s")},
        "goal_s": 2.0,
        "repeats": repeats,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
