"""Builders shared by the chat and handover tests: PEFT adapters with non-zero B, a model big enough to weigh."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch


def make_adapter(model_dir: Path, out_dir: Path, seed: int,
                 target_modules=("q_proj", "v_proj"), r: int = 4) -> Path:
    """Save a LoRA adapter for `model_dir` whose B is random (not PEFT's zero init), so it changes the logits."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(target_modules), init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(out_dir)
    return Path(out_dir)


def peft_reference(model_dir: Path, adapter_dir: Path | None):
    """The oracle: a fresh base from disk, with the adapter applied by PEFT itself (or none)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    return model.eval()


def make_weighty_llama(like_dir: Path, out_dir: Path, layers: int = 8, hidden: int = 512) -> int:
    """A random Llama with ~85 MB of float32 weights (tokenizer copied from `like_dir`); returns weight bytes.

    Weights are drawn directly with randn (seconds faster than transformers' initialisers on a shared CPU).
    """
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(like_dir)
    config.update(dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=8, num_key_value_heads=8, head_dim=hidden // 8))
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    gen = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(shape, generator=gen) * 0.02 for k, shape in shapes.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out_dir)
    for f in like_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out_dir / f.name)
    return sum(t.numel() * t.element_size() for t in tensors.values())
