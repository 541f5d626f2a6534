"""The contract between the trainer and a training backend (WGSL on wgpu, or ONNX Runtime on the CPU).

The trainer owns schedules, data order, evaluation cadence, checkpoints and reporting; a backend owns the model
on its device and does the arithmetic: forward, cross-entropy, backward into the LoRA gradients, global-norm
clipping, the non-finite guard and the optimizer update.

Conventions every backend follows, so they agree to 1e-3 with PyTorch + PEFT and with each other:
- `input_ids` and `labels` are int32 [B, T]; labels are *unshifted* as in Hugging Face (position t predicts
  labels[t+1]); IGNORE_LABEL (−100) marks a position that does not count. `shift_labels` and `counted_tokens` below
  are the one implementation of that rule, for both backends, evaluation and the corpus statistics.
- The loss of a step is the sum of token cross-entropies over all its micro-batches divided by the total count
  of counted tokens over all of them (so gradient accumulation equals one big batch).
- Clipping: if max_grad_norm > 0 and the global L2 norm of all LoRA gradients exceeds it, gradients are scaled
  by max_grad_norm / norm, as torch.nn.utils.clip_grad_norm_ does.
- A non-finite loss or gradient norm skips the update: weights, optimizer moments and the optimizer step count
  stay as they were, and the result says `skipped`.
- LoRA tensors are exchanged with PEFT's names and layouts (A [r, in], B [out, r], float32), see engine.lora.config.
- Preference objectives (DPO, ORPO; engine.backends.preference owns the formulas): `sequence_logps` gives each
  row's summed completion log-probability, with the adapter on or off (off = the DPO reference: the same
  weights, one more forward pass, no second copy); `preference_step` runs a whole step on micro-batches in the
  concatenated layout (chosen rows, then rejected rows). The step's loss is the mean over all its pairs, so
  gradient accumulation again equals one big batch; clipping and the non-finite guard are as above. A backend
  that cannot run them refuses with NotImplementedError naming itself.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from engine.backends.preference import PreferenceObjective
from engine.lora.config import LoraConfig
from engine.model.spec import ModelSpec

OPTIMIZERS = ("adamw", "adamw8bit", "sgd")
MATH_CHOICES = ("f32", "f16")   # MemoryOptions.math: the arithmetic of the frozen-weight products
IGNORE_LABEL = -100   # a label that does not count towards the loss (Hugging Face's ignore_index)


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = field(default="adamw", metadata={"help": "adamw | adamw8bit | sgd"})
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = field(default=0.0, metadata={"help": "decoupled (AdamW) weight decay"})
    block_size: int = field(default=256, metadata={"help": "8-bit AdamW: values per quantisation block"})

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.name!r} is unknown; choose from {', '.join(OPTIMIZERS)}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"betas must be in [0, 1), got ({self.beta1}, {self.beta2})")
        if self.eps <= 0 or self.weight_decay < 0:
            raise ValueError(f"eps must be > 0 and weight_decay >= 0, got {self.eps}, {self.weight_decay}")


@dataclass(frozen=True)
class MemoryOptions:
    """How a backend trades memory (and precision) on its device: the format its frozen matrices are held in,
    activation recompute, and the arithmetic of the frozen products. The CPU backend computes in f32 with
    onnxruntime's own memory plan and ignores all three."""
    weights: str = "f32"       # engine.model.weight_formats.WEIGHT_CHOICES
    recompute: bool = False    # keep only each layer's input; run its forward again before its backward
    math: str = "f32"          # MATH_CHOICES: "f16" multiplies frozen f16/bf16 weights in half precision (WGSL)

    def __post_init__(self):
        from engine.model.weight_formats import WEIGHT_CHOICES

        if self.weights not in WEIGHT_CHOICES:
            raise ValueError(f"weights {self.weights!r} is unknown; choose from {', '.join(WEIGHT_CHOICES)}")
        if not isinstance(self.recompute, bool):
            raise ValueError(f"recompute must be true or false, got {self.recompute!r}")
        if self.math not in MATH_CHOICES:
            raise ValueError(f"math {self.math!r} is unknown; choose from {', '.join(MATH_CHOICES)}")


@dataclass(frozen=True)
class StepResult:
    step: int            # optimizer updates applied so far (a skipped step does not count)
    loss: float          # mean token cross-entropy over the step's micro-batches
    tokens: int          # counted tokens (counted_tokens) in the step
    grad_norm: float     # global L2 norm of the LoRA gradients before clipping
    skipped: bool        # True when loss or gradient was non-finite and nothing was updated


@dataclass(frozen=True)
class PreferenceStepResult(StepResult):
    """A preference step: `loss` is the objective's, `tokens` the completion tokens of both answers."""
    pairs: int                 # pairs that counted (filler pairs of a short last batch do not)
    reward_margin: float       # mean(chosen reward − rejected reward), rewards as engine.backends.preference
    reward_accuracy: float     # fraction of pairs whose chosen reward is the larger
    chosen_reward: float
    rejected_reward: float


class PendingStep:
    """A step whose numbers may still be on the device: `result()` waits for them.

    The wgpu backend hands these back so the trainer can read the loss a step or two late and keep the GPU busy.
    """

    def __init__(self, resolve):
        self._resolve = resolve
        self._result: StepResult | None = None

    @classmethod
    def done(cls, result: StepResult) -> "PendingStep":
        pending = cls(None)
        pending._result = result
        return pending

    def result(self) -> StepResult:
        if self._result is None:
            self._result = self._resolve()
            self._resolve = None
        return self._result


class TrainingBackend(ABC):
    """One model + LoRA + optimizer on one device, sized once for (batch_size, seq_len)."""

    name: str              # shown to the user, e.g. "wgpu: NVIDIA H100 (Vulkan)" or "cpu: onnxruntime"
    spec: ModelSpec
    lora: LoraConfig
    optim: OptimizerConfig
    batch_size: int
    seq_len: int

    @abstractmethod
    def train_step(self, micro_batches: Sequence[tuple[np.ndarray, np.ndarray]], lr: float,
                   max_grad_norm: float) -> PendingStep:
        """Forward + backward over each (input_ids, labels) micro-batch, then clip, guard and update."""

    def gradients(self, micro_batches: Sequence[tuple[np.ndarray, np.ndarray]]
                  ) -> tuple[float, int, dict[str, np.ndarray]]:
        """(mean token cross-entropy, counted tokens, LoRA gradients of that mean under PEFT's names) over the
        micro-batches, with no clipping and no update: what a step computes before its optimizer (the AdaLoRA step
        of engine.train.adaptive applies its own update on the host, and tests compare them with PEFT)."""
        raise NotImplementedError(f"{self.name}: this backend does not hand out its gradients")

    def preference_step(self, micro_batches: Sequence[tuple[np.ndarray, np.ndarray]], objective: PreferenceObjective,
                        lr: float, max_grad_norm: float, reference: Sequence[np.ndarray] | None = None
                        ) -> PendingStep:
        """One DPO/ORPO step over micro-batches of (input_ids, labels) [2P, T], chosen rows first; the pending
        result is a PreferenceStepResult. `reference`: DPO's reference S per row of each micro-batch ([2P] each,
        as sequence_logps(..., adapter=False) gives; engine.train.reference caches them), or None: the backend
        runs the reference pass itself."""
        raise NotImplementedError(f"{self.name}: this backend does not run preference objectives (DPO, ORPO); "
                                  "use the CPU backend (--backend cpu)")

    def sequence_logps(self, input_ids: np.ndarray, labels: np.ndarray, adapter: bool = True
                       ) -> tuple[np.ndarray, np.ndarray]:
        """(Σ log-probability of each row's counted targets as float64 [B], counted targets per row int64 [B]),
        of the adapted model, or of the base model with `adapter=False`; no gradients, no update."""
        raise NotImplementedError(f"{self.name}: this backend does not compute sequence log-probabilities; "
                                  "use the CPU backend (--backend cpu)")

    @abstractmethod
    def eval_loss(self, input_ids: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
        """(sum of token cross-entropies, counted tokens) without touching gradients or weights."""

    @abstractmethod
    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """Float32 logits [B, T, vocab] of the adapted model (for tests and small checks)."""

    @abstractmethod
    def lora_state(self) -> dict[str, np.ndarray]:
        """Current LoRA tensors under PEFT's names."""

    @abstractmethod
    def lora_state_before_update(self) -> dict[str, np.ndarray]:
        """The LoRA tensors as they were before the last applied update (as loaded, while none was applied):
        the adapter whose forward and backward that step found finite. The trainer keeps it when later steps
        turn non-finite, since the weights the update made may be the ones whose forward overflows."""

    @abstractmethod
    def load_lora_state(self, state: dict[str, np.ndarray]) -> None:
        """Replace the LoRA tensors (same names and shapes as lora_state()); raise ValueError naming a mismatch."""

    @abstractmethod
    def optimizer_state(self) -> dict[str, np.ndarray]:
        """Everything needed to resume the optimizer exactly (moments, scales, "step" as a 0-d int64 array)."""

    @abstractmethod
    def load_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore what optimizer_state() returned."""

    @abstractmethod
    def memory_bytes(self) -> int:
        """Bytes this backend holds for the model, adapter, optimizer and activations (measured, not guessed)."""

    @abstractmethod
    def close(self) -> None:
        """Release every buffer and the device (the chat engine takes the memory back after this)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def shift_labels(labels: np.ndarray) -> np.ndarray:
    """int32 [B, T] targets: position t predicts labels[t+1]; the last position never counts (IGNORE_LABEL)."""
    labels = np.asarray(labels, np.int32)
    targets = np.full(labels.shape, IGNORE_LABEL, np.int32)
    targets[:, :-1] = labels[:, 1:]
    return targets


def counted_tokens(labels: np.ndarray) -> int:
    """Tokens that count towards the loss: shifted targets that are not IGNORE_LABEL."""
    return int(np.count_nonzero(shift_labels(labels) != IGNORE_LABEL))


def check_batch(input_ids: np.ndarray, labels: np.ndarray, batch_size: int, seq_len: int, vocab: int) -> None:
    """Raise ValueError if a batch does not fit what the backend was sized for."""
    if input_ids.shape != labels.shape or input_ids.ndim != 2:
        raise ValueError(f"input_ids {input_ids.shape} and labels {labels.shape} must both be [B, T]")
    b, t = input_ids.shape
    if b > batch_size or t > seq_len:
        raise ValueError(f"batch [{b}, {t}] exceeds the size this backend was built for [{batch_size}, {seq_len}]")
    if input_ids.size and (input_ids.min() < 0 or input_ids.max() >= vocab):
        raise ValueError(f"token id out of range 0..{vocab - 1}: {int(input_ids.min())}..{int(input_ids.max())}")
