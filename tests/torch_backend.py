"""A real TrainingBackend on PyTorch autograd + PEFT, for trainer tests only (never a product path).

It follows engine/backend.py's conventions exactly: summed token cross-entropy over all micro-batches divided by
the step's counted tokens, clipping as clip_grad_norm_, and a skipped update on a non-finite loss or norm.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from engine.backends.base import MemoryOptions
from engine.backends.base import (OptimizerConfig, PendingStep, StepResult, TrainingBackend, check_batch,
                            counted_tokens)
from engine.lora.config import LoraConfig, init_lora_state
from engine.model.spec import load_model_spec
from tests.oracle import peft_model


class TorchBackend(TrainingBackend):
    def __init__(self, model_dir, lora: LoraConfig, optim: OptimizerConfig, batch_size: int, seq_len: int,
                 seed: int = 0, init_state: dict[str, np.ndarray] | None = None):
        import torch

        if optim.name == "adamw8bit":
            raise ValueError("the PyTorch test backend has no 8-bit AdamW; use adamw or sgd")
        self.name = "torch: cpu (test backend)"
        self.spec = load_model_spec(model_dir)
        self.lora, self.optim = lora, optim
        self.batch_size, self.seq_len = batch_size, seq_len
        state = init_state if init_state is not None else init_lora_state(self.spec, lora, seed)
        self.model = peft_model(model_dir, lora, state)
        self._params = {name.replace(".default.weight", ".weight"): p
                        for name, p in self.model.named_parameters() if p.requires_grad}
        missing = set(state) ^ set(self._params)
        if missing:
            raise ValueError(f"LoRA state does not match the model: {sorted(missing)[:3]}")
        params = list(self._params.values())
        if optim.name == "adamw":
            self._opt = torch.optim.AdamW(params, lr=0.0, betas=(optim.beta1, optim.beta2), eps=optim.eps,
                                          weight_decay=optim.weight_decay)
        else:
            self._opt = torch.optim.SGD(params, lr=0.0, weight_decay=optim.weight_decay)
        self._step = 0
        self._previous = self.lora_state()     # before the last applied update

    def _ce_sum(self, input_ids, labels):
        import torch
        logits = self.model(input_ids=torch.from_numpy(input_ids.astype(np.int64))).logits[:, :-1]
        target = torch.from_numpy(labels[:, 1:].astype(np.int64))
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                 ignore_index=-100, reduction="sum")

    def train_step(self, micro_batches: Sequence[tuple[np.ndarray, np.ndarray]], lr: float,
                   max_grad_norm: float) -> PendingStep:
        import torch

        for ids, labels in micro_batches:
            check_batch(ids, labels, self.batch_size, self.seq_len, self.spec.vocab_size)
        total = sum(counted_tokens(labels) for _, labels in micro_batches)
        self._opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for ids, labels in micro_batches:
            ce = self._ce_sum(ids, labels)
            (ce / max(total, 1)).backward()
            loss_sum += float(ce.detach())
        loss = loss_sum / max(total, 1)
        grads = [p.grad for p in self._params.values() if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        if not (np.isfinite(loss) and np.isfinite(norm)):
            self._opt.zero_grad(set_to_none=True)
            return PendingStep.done(StepResult(self._step, loss, total, norm, True))
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(self._params.values()), max_grad_norm)
        for group in self._opt.param_groups:
            group["lr"] = lr
        self._previous = self.lora_state()
        self._opt.step()
        self._step += 1
        return PendingStep.done(StepResult(self._step, loss, total, norm, False))

    def eval_loss(self, input_ids: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
        import torch
        check_batch(input_ids, labels, self.batch_size, self.seq_len, self.spec.vocab_size)
        with torch.no_grad():
            return float(self._ce_sum(input_ids, labels)), counted_tokens(labels)

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        import torch
        with torch.no_grad():
            return self.model(input_ids=torch.from_numpy(input_ids.astype(np.int64))).logits.numpy()

    def lora_state(self) -> dict[str, np.ndarray]:
        return {k: p.detach().numpy().copy() for k, p in self._params.items()}

    def load_lora_state(self, state: dict[str, np.ndarray]) -> None:
        import torch
        if set(state) != set(self._params):
            raise ValueError(f"LoRA names differ: {sorted(set(state) ^ set(self._params))[:3]}")
        with torch.no_grad():
            for k, p in self._params.items():
                if tuple(state[k].shape) != tuple(p.shape):
                    raise ValueError(f"{k}: shape {state[k].shape} != {tuple(p.shape)}")
                p.copy_(torch.from_numpy(np.asarray(state[k], np.float32)))
        self._previous = self.lora_state()

    def lora_state_before_update(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self._previous.items()}

    def optimizer_state(self) -> dict[str, np.ndarray]:
        out = {"step": np.array(self._step, np.int64)}
        for k, p in self._params.items():
            for name, value in self._opt.state.get(p, {}).items():
                if name != "step" and value is not None:
                    out[f"{k}.{name}"] = value.detach().numpy().copy()
        return out

    def load_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        import torch
        self._step = int(state["step"])
        for k, p in self._params.items():
            moments = {key.rsplit(".", 1)[1]: v for key, v in state.items() if key.rsplit(".", 1)[0] == k}
            if moments:
                self._opt.state[p] = {name: torch.from_numpy(np.array(v)) for name, v in moments.items()}
                self._opt.state[p]["step"] = torch.tensor(float(self._step))

    def memory_bytes(self) -> int:
        tensors = list(self.model.parameters()) + [g for g in (p.grad for p in self._params.values()) if g is not None]
        tensors += [v for s in self._opt.state.values() for v in s.values() if hasattr(v, "element_size")]
        return int(sum(t.numel() * t.element_size() for t in tensors))

    def close(self) -> None:
        self.model = None
        self._params = {}
        self._opt = None


def torch_backend_factory(model_dir):
    """The trainer's backend factory signature, bound to one model folder. `memory` is not used: torch computes
    in f32 and autograd keeps its activations either way."""
    def factory(lora, optim, batch_size, seq_len, seed=0, init_state=None, memory=MemoryOptions()):
        return TorchBackend(model_dir, lora, optim, batch_size, seq_len, seed=seed, init_state=init_state)
    return factory
