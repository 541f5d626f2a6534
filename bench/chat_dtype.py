"""Chat on the CPU in float32, bfloat16 and float16: load time, weight bytes, prompt and decode speed (JSON).

Decides engine.chat.fit.chat_dtype's CPU choice. Usage: `python -m bench.chat_dtype [--model demo]` (any model
reference; the demo is SmolLM2-135M as Q4_1 GGUF, loaded through transformers' GGUF loader).
"""
from __future__ import annotations

import argparse
import json
import platform
import time


def main() -> None:
    import torch
    import transformers

    from engine.chat.generation import GenerationSettings
    from engine.chat.inference import ChatEngine
    from engine.backends.hardware import cpu_model

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=48)
    args = parser.parse_args()
    results = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        chat = ChatEngine(device="cpu", dtype=dtype)
        started = time.perf_counter()
        chat.load(args.model)
        load_s = time.perf_counter() - started
        model = chat._model
        weights = sum(t.numel() * t.element_size() for t in model.parameters())
        ids = torch.randint(0, model.config.vocab_size, (1, args.prompt_tokens))
        with torch.no_grad():
            model(input_ids=ids[:, :8])    # warm-up
            started = time.perf_counter()
            model(input_ids=ids)
            prompt_s = time.perf_counter() - started
        settings = GenerationSettings(max_new_tokens=args.new_tokens, temperature=0)
        messages = [{"role": "user", "content": "Tell me about the history of Paris."}]
        started = time.perf_counter()
        stream = chat.stream_chat(messages, settings)
        text = "".join(stream)
        decode_s = time.perf_counter() - started
        results.append({"dtype": str(dtype).removeprefix("torch."), "load_s": round(load_s, 2),
                        "weight_bytes": weights, "prompt_s": round(prompt_s, 3),
                        "decode_tokens_per_s": round(stream.tokens / decode_s, 1), "answer": text[:60]})
        chat.unload()
    print(json.dumps({"machine": {"cpu": cpu_model(), "threads": torch.get_num_threads(),
                                  "bf16_native": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                                  "python": platform.python_version(), "torch": torch.__version__,
                                  "transformers": transformers.__version__},
                      "model": args.model, "prompt_tokens": args.prompt_tokens, "results": results}, indent=1))


if __name__ == "__main__":
    main()
