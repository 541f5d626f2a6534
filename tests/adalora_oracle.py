"""PEFT's AdaLoraModel as the oracle of AdaLoRA training: the model, PEFT's documented training loop, and the
rank pattern it keeps, in the engine's terms."""
from __future__ import annotations

import numpy as np

from engine.lora.adalora import AdaLoraSettings


def peft_adalora_model(model_dir, settings: AdaLoraSettings, lora_alpha: float, targets, state=None):
    """The base model in float32 with PEFT's AdaLoRA (dropout 0), its A, E, B set from `state` (PEFT names)."""
    import torch
    from peft import AdaLoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    config = AdaLoraConfig(init_r=settings.init_r, target_r=settings.target_r, tinit=settings.tinit,
                           tfinal=settings.tfinal, deltaT=settings.deltaT, beta1=settings.beta1,
                           beta2=settings.beta2, orth_reg_weight=settings.orth_reg_weight,
                           total_step=settings.total_step, lora_alpha=lora_alpha, lora_dropout=0.0,
                           target_modules=list(targets), task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    if state is not None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for key, value in state.items():
                params[key + ".default"].copy_(torch.from_numpy(np.asarray(value, np.float32)))
    model.eval()
    return model


def peft_kept(model, modules) -> np.ndarray | None:
    """PEFT's current rank_pattern as [modules, init_r] bools in the engine's module order (None before any)."""
    from engine.lora.adalora import rank_pattern_key

    pattern = model.peft_config["default"].rank_pattern
    if pattern is None:
        return None
    pattern = {k.replace(".default", ""): v for k, v in pattern.items()}
    return np.array([pattern[rank_pattern_key(m.layer, m.target)] for m in modules], bool)


def peft_adalora_run(model, batches, lr: float, steps: int, modules, max_grad_norm: float = 0.0,
                     weight_decay: float = 0.0):
    """PEFT's documented loop (loss.backward(); clip; optimizer.step(); update_and_allocate(step);
    zero_grad()) with torch AdamW, steps numbered from 1; returns (losses, rank pattern after each step)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, eps=1e-8)
    losses, patterns = [], []
    for step in range(1, steps + 1):
        input_ids, labels = batches[(step - 1) % len(batches)]
        out = model(input_ids=torch.from_numpy(input_ids.astype(np.int64)),
                    labels=torch.from_numpy(labels.astype(np.int64)))
        out.loss.backward()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        model.base_model.update_and_allocate(step)
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
        patterns.append(peft_kept(model, modules))
    return losses, patterns


def peft_tensors(model) -> dict[str, np.ndarray]:
    """The live A, E, B under the engine's AdaLoRA names (untruncated)."""
    return {n.replace(".default", ""): p.detach().numpy().copy() for n, p in model.named_parameters()
            if ".lora_" in n}
