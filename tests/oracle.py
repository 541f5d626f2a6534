"""PyTorch autograd + PEFT as the oracle every training backend is checked against."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.lora.config import LoraConfig


def peft_model(model_dir, lora: LoraConfig, state: dict[str, np.ndarray] | None = None):
    """The base model in float32 with a PEFT LoRA of `lora`, its tensors set from `state` (PEFT names)."""
    import torch
    from peft import LoraConfig as PeftLoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model = get_peft_model(base, PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0,
                                                target_modules=list(lora.targets), use_rslora=lora.use_rslora))
    if state is not None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for key, value in state.items():
                name = key.replace(".weight", ".default.weight")
                params[name].copy_(torch.from_numpy(np.asarray(value, np.float32)))
    model.eval()  # dropout off; LoRA params still require grad
    return model


def random_lora_state(spec, lora: LoraConfig, seed: int = 0, b_scale: float = 0.05) -> dict[str, np.ndarray]:
    """PEFT-style A and a non-zero B, so every gradient (dA needs B ≠ 0) is non-trivial."""
    from engine.lora.config import init_lora_state

    rng = np.random.default_rng(seed + 1000)
    state = init_lora_state(spec, lora, seed)
    for key in state:
        if ".lora_B." in key:
            state[key] = (rng.standard_normal(state[key].shape) * b_scale).astype(np.float32)
    return state


@dataclass
class OracleStep:
    loss: float
    logits: np.ndarray              # [B, T, V]
    grads: dict[str, np.ndarray]    # PEFT names


def loss_and_grads(model, input_ids: np.ndarray, labels: np.ndarray) -> OracleStep:
    """HF's own shifted, −100-masked mean cross-entropy and the LoRA gradients of it."""
    import torch

    model.zero_grad(set_to_none=True)
    out = model(input_ids=torch.from_numpy(input_ids.astype(np.int64)),
                labels=torch.from_numpy(labels.astype(np.int64)))
    out.loss.backward()
    grads = {name.replace(".default.weight", ".weight"): p.grad.detach().numpy().copy()
             for name, p in model.named_parameters() if p.requires_grad}
    return OracleStep(float(out.loss.detach()), out.logits.detach().numpy(), grads)


def adamw_trajectory(model, batches, lr: float, steps: int, weight_decay: float = 0.0,
                     max_grad_norm: float = 0.0) -> list[float]:
    """Losses of `steps` torch.optim.AdamW steps over `batches` (cycled), clipping as clip_grad_norm_ does."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, eps=1e-8)
    losses = []
    for i in range(steps):
        input_ids, labels = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=torch.from_numpy(input_ids.astype(np.int64)),
                    labels=torch.from_numpy(labels.astype(np.int64)))
        out.loss.backward()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        losses.append(float(out.loss.detach()))
    return losses


def random_batch(vocab: int, batch: int, seq: int, seed: int = 0, masked_fraction: float = 0.3):
    """int32 input_ids and labels [B, T]; a fraction of labels masked with −100 (never all of them)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, seq)).astype(np.int32)
    labels = ids.copy()
    labels[rng.random((batch, seq)) < masked_fraction] = -100
    labels[:, -1] = ids[:, -1]
    return ids, labels
