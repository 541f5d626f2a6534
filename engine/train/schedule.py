"""Learning-rate schedules with linear warmup, the same curves as transformers' get_*_schedule_with_warmup.

`lr_at(step)` is the rate of the update made *at* 0-based position `step`, so the first update of a run with
warmup uses 0, exactly as Hugging Face's LambdaLR does; a schedule is a pure function of the step, which is all
a checkpoint needs to store to continue it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class Schedule:
    lr: float = field(metadata={"help": "peak learning rate"})
    total_steps: int = field(metadata={"help": "optimizer steps in the run"})
    kind: str = field(default="cosine", metadata={"help": "constant | linear | cosine (decay to 0 after warmup)"})
    warmup_steps: int = field(default=0, metadata={"help": "steps of linear warmup from 0 to lr"})

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"learning-rate schedule {self.kind!r} is unknown; choose from {', '.join(SCHEDULES)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"learning rate must be a positive finite number, got {self.lr!r}")
        if self.total_steps < 1:
            raise ValueError(f"a run needs at least 1 step, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup ({self.warmup_steps} steps) must be between 0 and the run's "
                             f"{self.total_steps} steps")

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / max(1, self.warmup_steps)
        if self.kind == "constant":
            return 1.0
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        if self.kind == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    def lr_at(self, step: int) -> float:
        return self.lr * self.factor(step)
