"""AdaLoRA (Zhang et al., 2023; PEFT's AdaLoraConfig / AdaLoraModel): an SVD-shaped adapter P·Λ·Q whose
triplets are pruned toward a total-rank budget by smoothed sensitivity.

This module owns the settings; the parametrization, the rank allocator and the training step build on them.
The field names and defaults are PEFT 0.21.2's, so a setting means here what it means there.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class AdaLoraSettings:
    init_r: int = field(default=12, metadata={"help": "rank every targeted projection starts with"})
    target_r: int = field(default=8, metadata={"help": "average rank per projection once the budget is spent"})
    tinit: int = field(default=0, metadata={"help": "steps before pruning starts (the budget stays full)"})
    tfinal: int = field(default=0, metadata={"help": "last steps that train with the final ranks fixed"})
    deltaT: int = field(default=1, metadata={"help": "steps between two budget allocations"})
    beta1: float = field(default=0.85, metadata={"help": "EMA factor of the sensitivity"})
    beta2: float = field(default=0.85, metadata={"help": "EMA factor of the sensitivity's uncertainty"})
    orth_reg_weight: float = field(default=0.5, metadata={"help": "weight of the orthogonality regulariser on P, Q"})
    total_step: int = field(default=0, metadata={
        "help": "the run's optimizer steps; 0: filled in from the run's length when the run is planned"})

    def __post_init__(self):
        for name, low in (("init_r", 1), ("target_r", 1), ("tinit", 0), ("tfinal", 0), ("deltaT", 1),
                          ("total_step", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"adaptive rank: {name} must be an integer >= {low}, got {value!r}")
        if self.target_r > self.init_r:
            raise ValueError(f"adaptive rank: the target rank ({self.target_r}) cannot exceed the initial rank "
                             f"({self.init_r}); pruning only removes rank")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"adaptive rank: {name} must be in [0, 1), got {getattr(self, name)!r}")
        if not self.orth_reg_weight >= 0:
            raise ValueError(f"adaptive rank: orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")
        if self.total_step and self.tinit >= self.total_step - self.tfinal:
            raise ValueError(f"adaptive rank: tinit {self.tinit} and tfinal {self.tfinal} leave no budgeting phase "
                             f"in {self.total_step} steps; lower them or train longer")

    def to_dict(self) -> dict:
        return asdict(self)
