"""PEFT adapters for the export tests, made by peft itself on the tiny models, with non-zero random B."""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROBE_TOKENS = [5, 17, 42, 99, 120, 3, 77, 200, 31, 8]


@contextlib.contextmanager
def quiet_peft():
    """peft 0.21 calls transformers' deprecated is_gradient_checkpointing: noise, not ours."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def make_mistral(out_dir: Path) -> Path:
    """A tiny Mistral: the llama fixture's shapes under model_type "mistral" (llama.cpp exports it as llama)."""
    from bench.tiny_models import make_model

    make_model("llama", out_dir, seed=1, model_type="mistral")
    return out_dir


def load_base(base_dir: Path, dtype=None):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype or torch.float32).eval()


def make_adapter(base_dir: Path, out_dir: Path, *, seed: int = 0, r: int = 4, lora_alpha: float = 8,
                 target_modules=None, b_std: float = 0.2, **config) -> Path:
    """get_peft_model on the base, B drawn from N(0, b_std) (PEFT starts it at zero), save_pretrained."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = load_base(base_dir)
    torch.manual_seed(seed)  # PEFT draws A from the global generator
    lora = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=target_modules or ALL_PROJECTIONS,
                      task_type="CAUSAL_LM", **config)
    with quiet_peft():
        peft_model = get_peft_model(model, lora)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * b_std)
    peft_model.save_pretrained(out_dir)
    return out_dir


def make_adalora_adapter(base_dir: Path, out_dir: Path, *, seed: int = 0, steps: int = 4, **config) -> Path:
    """A PEFT AdaLoRA adapter pruned by PEFT itself: `steps` SGD steps on random tokens, each followed by
    update_and_allocate, so save_pretrained writes kept-triplet masks (some all-pruned) and resized tensors."""
    import torch
    from peft import AdaLoraConfig, get_peft_model

    torch.manual_seed(seed)
    settings = {"init_r": 4, "target_r": 1, "tinit": 0, "tfinal": 1, "deltaT": 1, "lora_alpha": 8,
                "target_modules": ALL_PROJECTIONS}
    adalora = AdaLoraConfig(task_type="CAUSAL_LM", total_step=steps, **{**settings, **config})
    with quiet_peft():
        model = get_peft_model(load_base(base_dir), adalora)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():   # PEFT starts E at zero (the adapter then changes nothing); draw it and B instead
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_E" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=generator)
    for step in range(1, steps + 1):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    model.save_pretrained(out_dir)
    return out_dir


def peft_logits(base_dir: Path, adapter_dir: Path | None, tokens=PROBE_TOKENS):
    """Logits (T, vocab) of the base, or of base + adapter loaded through PeftModel.from_pretrained."""
    import torch
    from peft import PeftModel

    model = load_base(base_dir)
    if adapter_dir is not None:
        with quiet_peft():
            model = PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()
