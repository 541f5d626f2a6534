"""LoRA configuration, PEFT naming and PEFT-identical initialisation, shared by every training backend."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from engine.model.hf_names import FUSED_TARGETS, LORA_TARGETS, TARGET_ORDER, module_path
from engine.model.spec import ModelSpec


@dataclass(frozen=True)
class LoraConfig:
    rank: int = field(default=16, metadata={"help": "r: the rank of the low-rank update"})
    alpha: float = field(default=32.0, metadata={"help": "lora_alpha; scaling is alpha/r (rsLoRA: alpha/sqrt(r))"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA branch input, 0 disables"})
    targets: tuple[str, ...] = field(default=LORA_TARGETS, metadata={
        "help": "projections that get an adapter (on Phi-3 the fused qkv_proj and gate_up_proj: fit_targets)"})
    use_rslora: bool = field(default=False, metadata={"help": "rank-stabilised scaling alpha/sqrt(r)"})

    def __post_init__(self):
        if not isinstance(self.rank, int) or not 1 <= self.rank <= 1024:
            raise ValueError(f"LoRA rank must be an integer in 1..1024, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        targets = tuple(dict.fromkeys(self.targets))
        unknown = [t for t in targets if t not in TARGET_ORDER]
        if unknown or not targets:
            raise ValueError(f"unknown LoRA targets {unknown or '(none)'}; choose from {', '.join(TARGET_ORDER)}")
        # Keep the canonical order so names, buffers and files always line up.
        object.__setattr__(self, "targets", tuple(t for t in TARGET_ORDER if t in targets))

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def trainable_parameters(self, spec: ModelSpec) -> int:
        """r·(in + out) per targeted projection per layer — the count PEFT reports."""
        return spec.layers * sum(self.rank * sum(spec.projection_shape(t)) for t in fit_targets(spec, self).targets)


def fit_targets(spec: ModelSpec, lora: LoraConfig) -> LoraConfig:
    """`lora` with its targets named as `spec`'s model names its projections: on a model with fused projections
    (Phi-3) the members q/k/v (gate/up), all of them, become the fused qkv_proj (gate_up_proj), so the default
    target list means every projection there too; a fused name on a model without them is refused, as are some
    members without the others (their LoRA shares one A: PEFT cannot adapt q_proj alone on Phi-3)."""
    targets = list(lora.targets)
    if spec.fused:
        for fused, members in FUSED_TARGETS.items():
            present = [m for m in members if m in targets]
            if present and len(present) < len(members):
                raise ValueError(f"{spec.model_type} stores {', '.join(members)} as one projection, {fused}: adapt "
                                 f"all of them (target {fused}) or none, not {', '.join(present)} alone")
            if present:
                targets = [t for t in targets if t not in members] + [fused]
    wrong = [t for t in dict.fromkeys(targets) if t not in spec.lora_targets]
    if wrong:
        raise ValueError(f"{spec.model_type} has no projection {', '.join(wrong)} to adapt; its LoRA targets are "
                         f"{', '.join(spec.lora_targets)}")
    return lora if tuple(targets) == lora.targets else replace(lora, targets=tuple(targets))


def peft_key(layer: int, target: str, which: str) -> str:
    """Tensor name PEFT writes: base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight."""
    return f"base_model.model.{module_path(layer, target)}.lora_{which}.weight"


def lora_shapes(spec: ModelSpec, config: LoraConfig) -> dict[str, tuple[int, int]]:
    """Every LoRA tensor's PEFT key and shape, layer by layer in target order, A before B: A [r, in], B [out, r].

    The one owner of these shapes: initialisation, the GPU buffer layout and adapter import all iterate it."""
    config = fit_targets(spec, config)      # the default targets name Phi-3's fused projections
    shapes = {}
    for layer in range(spec.layers):
        for target in config.targets:
            out_f, in_f = spec.projection_shape(target)
            shapes[peft_key(layer, target, "A")] = (config.rank, in_f)
            shapes[peft_key(layer, target, "B")] = (out_f, config.rank)
    return shapes


def init_lora_state(spec: ModelSpec, config: LoraConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """A as PEFT initialises it (kaiming_uniform_(a=√5): U(-1/√in, 1/√in)), B zero — so the adapted model
    starts equal to the base. Keys are PEFT's; A is [r, in], B is [out, r], float32."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in lora_shapes(spec, config).items():
        if key.endswith("lora_A.weight"):
            bound = 1.0 / math.sqrt(shape[1])
            state[key] = rng.uniform(-bound, bound, shape).astype(np.float32)
        else:
            state[key] = np.zeros(shape, np.float32)
    return state
