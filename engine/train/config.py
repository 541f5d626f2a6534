"""`TrainConfig`: every setting of a training run, validated once, and stored in each checkpoint."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from engine.backends.base import MemoryOptions, OptimizerConfig
from engine.backends.preference import OBJECTIVES, PreferenceObjective
from engine.lora.adalora import AdaLoraSettings
from engine.lora.config import LoraConfig
from engine.train.reference import REFERENCE_MODES
from engine.train.schedule import SCHEDULES


@dataclass(frozen=True)
class TrainConfig:
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "the adapter being trained"})
    optim: OptimizerConfig = field(default_factory=OptimizerConfig, metadata={"help": "optimizer and weight decay"})
    batch_size: int = field(default=8, metadata={"help": "sequences per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    seq_len: int = field(default=512, metadata={"help": "tokens per sequence"})
    epochs: int = field(default=1, metadata={"help": "passes over the training data (unless max_steps is set)"})
    max_steps: int = field(default=0, metadata={"help": "optimizer steps to run; 0: as many as `epochs` take"})
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate"})
    schedule: str = field(default="cosine", metadata={"help": "constant | linear | cosine"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warmup steps"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the global gradient norm to this; 0: off"})
    seed: int = field(default=0, metadata={"help": "seeds LoRA init and data order: same seed, same run"})
    shuffle: bool = field(default=True, metadata={"help": "shuffle batches each epoch"})
    eval_every: int = field(default=0, metadata={"help": "evaluate every N steps (and at the end); 0: at the end"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (and at the end); 0: at the end"})
    keep_checkpoints: int = field(default=2, metadata={"help": "newest checkpoints kept"})
    max_nonfinite_in_a_row: int = field(default=3, metadata={
        "help": "stop after this many consecutive steps with a NaN/inf loss or gradient"})
    recompute: bool | None = field(default=False, metadata={
        "help": "activation recompute (WGSL backend): keep only each layer's input and run its forward again in "
                "the backward; the same gradients, far less memory, about one more forward pass per step. "
                "None: the memory plan decides (engine.train.runs.prepare_run)"})
    objective: str = field(default="sft", metadata={
        "help": "sft (next-token cross-entropy) | dpo | orpo (preference pairs: batch_size counts rows, two per "
                "pair, so it must be even)"})
    beta: float = field(default=0.1, metadata={"help": "DPO β (TRL's default 0.1)"})
    label_smoothing: float = field(default=0.0, metadata={"help": "DPO label smoothing ε in [0, 0.5)"})
    orpo_lambda: float = field(default=0.1, metadata={"help": "ORPO λ, the odds-ratio term's weight (TRL's 0.1)"})
    reference_logps: str = field(default="auto", metadata={
        "help": "DPO: the reference's (the base model's) log-probabilities: cached (once per pair, reused: the "
                "reference never changes) | per-step (a reference forward pass every micro-batch) | auto (cached "
                "when some pair is seen more than once; engine.train.reference)"})
    weights: str = field(default="f32", metadata={
        "help": "the format the WGSL backend holds the frozen weights in: auto (the memory plan decides), stored "
                "(as the model file holds them), f32, bf16, f16, q8, q4; the CPU backend computes in f32"})
    math: str = field(default="f32", metadata={
        "help": "arithmetic of the frozen-weight products on the WGSL backend: f32, or f16 (weights held f16/bf16 "
                "multiplied in half precision, f32 accumulation); the CPU backend computes in f32"})
    adaptive_rank: AdaLoraSettings | None = field(default=None, metadata={
        "help": "AdaLoRA: train SVD-shaped adapters of rank init_r and prune them toward an average target_r, "
                "moving rank to the projections that need it; None: plain LoRA of lora.rank"})

    def __post_init__(self):
        for name, low in (("batch_size", 1), ("grad_accum", 1), ("seq_len", 2), ("epochs", 1), ("max_steps", 0),
                          ("warmup_steps", 0), ("seed", 0), ("eval_every", 0), ("save_every", 0),
                          ("keep_checkpoints", 1), ("max_nonfinite_in_a_row", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} is unknown; choose from {', '.join(SCHEDULES)}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"learning rate must be a positive finite number, got {self.lr!r}")
        if self.recompute is not None and not isinstance(self.recompute, bool):
            raise ValueError(f"recompute must be true or false, got {self.recompute!r}")
        if self.weights != "auto":
            MemoryOptions(weights=self.weights)     # names the choices when it is not one
        MemoryOptions(math=self.math)
        if not (self.max_grad_norm >= 0 and math.isfinite(self.max_grad_norm)):
            raise ValueError(f"max-grad-norm must be >= 0 (0 turns clipping off), got {self.max_grad_norm!r}")
        if self.reference_logps not in REFERENCE_MODES:
            raise ValueError(f"reference-logps {self.reference_logps!r} is unknown; choose from "
                             f"{', '.join(REFERENCE_MODES)}")
        if self.objective not in ("sft",) + OBJECTIVES:
            raise ValueError(f"objective {self.objective!r} is unknown; choose from sft, {', '.join(OBJECTIVES)}")
        if self.objective != "sft":
            self.preference_objective()             # validates beta, label_smoothing, orpo_lambda
            if self.batch_size % 2:
                raise ValueError(f"batch-size {self.batch_size} with objective {self.objective}: a micro-batch holds "
                                 "whole pairs (a chosen and a rejected row each), so batch-size must be even")
            if self.lora.dropout > 0:
                # Refused here, before any reading or building, as well as by both backends' preference steps.
                raise ValueError(f"lora dropout {self.lora.dropout:g} with objective {self.objective}: the policy's "
                                 "log-probabilities, the reference's and the gradient are computed in separate "
                                 "passes, which would see different dropout masks; set lora dropout to 0 for "
                                 "DPO/ORPO")
        if self.adaptive_rank is not None:
            self._check_adaptive_rank()

    def _check_adaptive_rank(self) -> None:
        """AdaLoRA is trained exactly as PEFT's AdaLoraModel for what engine.train.adaptive computes; the rest is
        refused by name rather than approximated."""
        a = self.adaptive_rank
        if not isinstance(a, AdaLoraSettings):
            raise TypeError(f"adaptive_rank must be AdaLoraSettings or None, got {type(a).__name__}")
        if self.objective != "sft":
            raise ValueError(f"adaptive rank (AdaLoRA) with objective {self.objective}: not implemented (the "
                             "preference step has no AdaLoRA path); train with objective sft or without adaptive rank")
        if self.lora.dropout > 0:
            raise ValueError(f"adaptive rank (AdaLoRA) with lora dropout {self.lora.dropout}: not implemented (the "
                             "host step asks the backend for plain gradients); set lora dropout to 0")
        if self.lora.use_rslora:
            raise ValueError("adaptive rank (AdaLoRA) with rsLoRA: AdaLoRA has its own scaling "
                             "(lora_alpha / init_r); turn rsLoRA off")
        if self.lora.rank != a.init_r:
            raise ValueError(f"adaptive rank: LoRA rank {self.lora.rank} differs from init_r {a.init_r}; an AdaLoRA "
                             f"run starts every projection at init_r, so set the LoRA rank to {a.init_r}")

    def preference_objective(self) -> PreferenceObjective | None:
        """The DPO/ORPO settings, or None for supervised fine-tuning."""
        if self.objective == "sft":
            return None
        return PreferenceObjective(self.objective, beta=self.beta, label_smoothing=self.label_smoothing,
                                   orpo_lambda=self.orpo_lambda)

    def memory_options(self) -> MemoryOptions:
        """What the backend is built with; "auto" settings must have been resolved by the memory plan first."""
        if self.weights == "auto" or self.recompute is None:
            raise ValueError("weights/recompute 'auto' reach the backend unresolved; plan the run first "
                             "(engine.train.memory_fit via engine.train.runs.prepare_run)")
        return MemoryOptions(weights=self.weights, recompute=self.recompute, math=self.math)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["lora"]["targets"] = list(self.lora.targets)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        data = dict(data)
        lora = dict(data.pop("lora"))
        lora["targets"] = tuple(lora["targets"])
        adaptive = data.pop("adaptive_rank", None)
        return cls(lora=LoraConfig(**lora), optim=OptimizerConfig(**data.pop("optim")),
                   adaptive_rank=AdaLoraSettings(**adaptive) if adaptive else None, **data)
