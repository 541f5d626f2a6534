"""`lora-lab chat`: one reply from a model (and adapter) to a prompt, through transformers + peft."""
from __future__ import annotations

import sys


def register(subparsers):
    p = subparsers.add_parser("chat", help="generate a reply to one prompt",
                              description="Generate one reply with the model's chat template (if it has one), "
                                          "optionally with a PEFT LoRA adapter.")
    p.add_argument("--model", required=True, metavar="M", help="model folder, .gguf file, hub id or 'demo'")
    p.add_argument("--adapter", metavar="DIR", help="a PEFT LoRA adapter folder to apply")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="the user's message")
    p.add_argument("--max-new-tokens", type=int, default=128, help="(default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed when temperature > 0")
    p.set_defaults(func=run_chat)


def generate_reply(model: str, prompt: str, adapter: str | None = None, max_new_tokens: int = 128,
                   temperature: float = 0.0, seed: int = 0) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.adapter_io import read_adapter_config
    from engine.runs import resolve_base

    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0 is greedy), got {temperature}")
    folder, _ = resolve_base(model)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    if adapter:
        from peft import PeftModel
        read_adapter_config(adapter)          # refuse what cannot be honoured, with the reason
        lm = PeftModel.from_pretrained(lm, adapter)
    lm.eval()
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
    with torch.no_grad():
        out = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                          pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                          else tokenizer.eos_token_id, **sampling)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def run_chat(args) -> int:
    reply = generate_reply(args.model, args.prompt, args.adapter, args.max_new_tokens, args.temperature, args.seed)
    sys.stdout.write(reply + "\n")
    return 0
