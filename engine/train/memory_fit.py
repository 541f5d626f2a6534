"""Fit a run to the GPU it will train on: the weight format, activation recompute and micro-batch that make the
WGSL engine's allocation (engine.backends.wgpu.memory.memory_plan, equal to what it allocates) fit a budget.

The order of preference is quality first, then speed: the widest weight format that fits (bf16 up to ~1B
parameters; 8-bit, then 4-bit above, as the peers' QLoRA presets do; a GGUF keeps its own quantization), then no
recompute (recompute costs a second forward), then the largest micro-batch, with gradient accumulation keeping
the effective batch. A run that cannot fit even at 4 bits, with recompute and micro-batch 1, is refused with the
numbers.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Mapping

from engine.backends.base import OptimizerConfig
from engine.backends.wgpu.memory import MemoryPlan, memory_plan
from engine.lora.config import LoraConfig
from engine.model.spec import ModelSpec
from engine.model.weight_formats import WEIGHT_CHOICES, WeightFormat

HEADROOM = 0.92               # of the GPU's memory: the driver, the window and other programs keep the rest
SMALL_MODEL_PARAMETERS = 1.2e9  # up to here bf16 is the default; above it 8-bit, then 4-bit
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.I)


class PlanDoesNotFit(ValueError):
    """No weight format, recompute or micro-batch makes the run fit the budget; the message has the numbers."""


@dataclass(frozen=True)
class FitPlan:
    weights: str                # a WEIGHT_CHOICES value the backend holds the frozen matrices in
    recompute: bool             # activation recompute (only each layer's input kept)
    micro_batch: int            # sequences per micro-batch
    grad_accum: int             # micro-batches per optimizer step
    memory: MemoryPlan          # what the WGSL engine allocates for it
    budget: int | None          # usable bytes it was fitted to (None: no budget known, nothing checked)

    def lines(self) -> list[str]:
        m = self.memory
        fit = f" of {gib(self.budget)} usable" if self.budget else " (GPU memory unknown: not checked)"
        return [f"plan: weights {self.weights}, recompute {'on' if self.recompute else 'off'}, micro-batch "
                f"{self.micro_batch} x {self.grad_accum} accumulated",
                f"GPU memory: {gib(m.total)}{fit} (weights {gib(m.weights)}, adapter+optimizer "
                f"{gib(m.adapter + m.optimizer)}, activations {gib(m.activations)}, logits {gib(m.logits)}, "
                f"scratch {gib(m.scratch + m.kernels)})"]

    def to_dict(self) -> dict:
        return {"weights": self.weights, "recompute": self.recompute, "micro_batch": self.micro_batch,
                "grad_accum": self.grad_accum, "budget_bytes": self.budget, "memory": self.memory.as_dict()}


def gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2 ** 30:.2f} GiB"


def parse_bytes(text: str) -> int:
    """'8GB', '8 GiB', '7.5g', '8192MB', '123456' -> bytes (GB and GiB both taken as 2**30: what cards quote)."""
    match = _SIZE.match(str(text))
    if match is None:
        raise ValueError(f"memory size {text!r} is not a number with an optional unit (e.g. 8GB, 7.5GiB, 6000MB)")
    unit = (match.group(2) or "").lower().rstrip("b").rstrip("i")
    return int(float(match.group(1)) * 2 ** (10 * " kmgt".index(unit or " ")))


def weight_candidates(spec: ModelSpec, weights: str, stored: Mapping[str, WeightFormat] | None) -> tuple[str, ...]:
    """The weight formats to try, best first: the one asked for, or (weights "auto") by model size and file."""
    if weights != "auto":
        if weights not in WEIGHT_CHOICES:
            raise ValueError(f"weights {weights!r} is unknown; choose from auto, {', '.join(WEIGHT_CHOICES)}")
        return (weights,)
    quantized = stored and any(f not in (WeightFormat.F32, WeightFormat.F16, WeightFormat.BF16)
                               for f in stored.values())
    if quantized:
        return ("stored", "q4")          # a GGUF's own blocks; wider would only cost memory, not add quality
    if spec.parameter_count() <= SMALL_MODEL_PARAMETERS:
        return ("bf16", "q8", "q4")
    return ("q8", "q4")


def fit_plan(spec: ModelSpec, lora: LoraConfig, optim: OptimizerConfig, batch_size: int, seq_len: int,
             budget: int | None, weights: str = "auto", recompute: bool | None = None,
             stored: Mapping[str, WeightFormat] | None = None, grad_accum: int = 1,
             max_binding_bytes: int = 128 << 20) -> FitPlan:
    """The first (weights, recompute, micro-batch) in order of preference whose allocation fits `budget` usable
    bytes; with no budget, the preferred one unchecked. `recompute` None lets the plan decide; the effective
    batch (batch_size x grad_accum) is kept. PlanDoesNotFit when nothing fits."""
    effective = batch_size * grad_accum
    micro_batches = [m for m in range(batch_size, 0, -1) if effective % m == 0]
    recomputes = (False, True) if recompute is None else (recompute,)
    tried = None
    for choice in weight_candidates(spec, weights, stored):
        for again in recomputes:
            for micro in micro_batches:
                plan = memory_plan(spec, lora, optim, micro, seq_len, max_binding_bytes=max_binding_bytes,
                                   weights=choice, stored=stored, recompute=again)
                candidate = FitPlan(choice, again, micro, effective // micro, plan, budget)
                if budget is None or plan.total <= budget:
                    return candidate
                tried = candidate
    assert tried is not None
    raise PlanDoesNotFit(
        f"the run does not fit: even with weights {tried.weights}, recompute "
        f"{'on' if tried.recompute else 'off'} and micro-batch {tried.micro_batch} it needs "
        f"{gib(tried.memory.total)} (weights {gib(tried.memory.weights)}, activations "
        f"{gib(tried.memory.activations)}) and {gib(budget)} is usable; shorten --seq-len, lower --rank, or "
        "choose a smaller model")


def usable_budget(gpu_memory: int | None) -> int | None:
    """The bytes a run may plan to use on a GPU of `gpu_memory` bytes (HEADROOM of it), or None when unknown."""
    return None if gpu_memory is None else int(gpu_memory * HEADROOM)


def with_plan(config, plan: FitPlan):
    """A TrainConfig that trains as `plan` says (micro-batch and accumulation; weights and recompute)."""
    return replace(config, batch_size=plan.micro_batch, grad_accum=plan.grad_accum, weights=plan.weights,
                   recompute=plan.recompute)
