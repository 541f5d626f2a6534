"""An AdaLoRA run's step, the same on every backend: a reparametrization on the host over the backend's LoRA.

The backend runs ordinary LoRA of rank init_r; before each step it holds A_eff = c·(E ⊙ A) and B
(engine.lora.adalora.effective_lora). A step asks it only for the gradients of the mean token cross-entropy
(`gradients`, no update) and then, in PEFT's order (loss.backward(); clip; optimizer.step();
update_and_allocate(step); zero_grad()):
  1. chain rule back to A, E, B, plus the orthogonality regulariser's gradient (its value joins the loss, as
     AdaLoraModel.forward adds it to outputs.loss);
  2. the global-norm clip over A, E, B (torch.nn.utils.clip_grad_norm_) and the non-finite guard;
  3. the engine's host optimizer (torch-identical AdamW) on the flat A, E, B; the backend's own is not used;
  4. the rank allocator with the step number (1-based, skipped steps counted, as the trainer counts them):
     importance EMAs from the updated parameters and the clipped gradients, masking E on the budget schedule;
  5. A_eff, B loaded into the backend for the next forward.
The wrapper is a TrainingBackend, so the trainer's evaluation, checkpoints and reporting see an ordinary one:
lora_state() is the effective LoRA (a checkpoint's adapter is a loadable LoRA equal to the AdaLoRA model), and
optimizer_state() carries the host optimizer and every AdaLoRA array, so a resume continues exactly.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from engine.backends.base import (
    OptimizerConfig,
    PendingStep,
    StepResult,
    TrainingBackend,
)
from engine.backends.optimizers import clip_scale, global_grad_norm, make_host_optimizer
from engine.lora import adalora
from engine.lora.adalora_write import FOLDED_DIR, export_adalora_adapter
from engine.lora.peft_write import export_adapter
from engine.lora.config import LoraConfig, peft_key

STATE_PREFIX = "adalora."          # optimizer_state() keys of the AdaLoRA arrays; the rest is the host optimizer's


@dataclass(frozen=True)
class AdaptiveStepResult(StepResult):
    rank_map: tuple[tuple[int, ...], ...] = ()     # ranks kept after this step, [layer][target]


def backend_lora(lora: LoraConfig, settings: adalora.AdaLoraSettings) -> LoraConfig:
    """The ordinary LoRA the backend runs for an AdaLoRA run: rank init_r, the run's lora_alpha."""
    return replace(lora, rank=settings.init_r)


class AdaptiveRankBackend(TrainingBackend):
    def __init__(self, backend: TrainingBackend, settings: adalora.AdaLoraSettings, optim: OptimizerConfig,
                 seed: int = 0, init: dict[str, np.ndarray] | None = None, threads: int | None = None):
        """`backend` runs LoRA of rank settings.init_r; `init`: PEFT-named, untruncated AdaLoRA tensors to start
        from (None: PEFT's initialisation from `seed`); `threads` for the host optimizer (default: up to 4 of the
        machine's cores; the update is element-wise, so the result does not depend on it)."""
        if backend.lora.rank != settings.init_r:
            raise ValueError(f"adaptive rank: the backend runs LoRA rank {backend.lora.rank}, not init_r "
                             f"{settings.init_r}; build it with engine.train.adaptive.backend_lora")
        self.inner, self.settings = backend, settings
        self.name, self.spec, self.lora, self.optim = backend.name, backend.spec, backend.lora, optim
        self.batch_size, self.seq_len = backend.batch_size, backend.seq_len
        self.params = adalora.init_adalora_params(backend.spec, backend.lora.targets, settings.init_r, seed)
        if init is not None:
            self.params.load_peft_tensors(init)
        self.grads = self.params.like(np.zeros_like(self.params.flat))
        self.previous = self.params.flat.copy()         # A, E, B before the last applied update
        self._step_grads = np.empty_like(self.params.flat)
        self.c = adalora.adalora_scaling(backend.lora.alpha, settings.init_r) / backend.lora.scaling
        self.allocator = adalora.RankAllocator(settings, self.params)
        self.optimizer = make_host_optimizer(optim, self.params.flat.size,
                                             threads=threads or min(4, os.cpu_count() or 1))
        self.step_number = 0                             # steps attempted (the allocator's global_step)
        # What the host holds besides the backend, each the size of A, E, B: the parameters, their gradients, the
        # previous copy, the optimizer's gradient scratch, the allocator's two EMAs and two scratch vectors; plus
        # the optimizer's state (sized once, above).
        self._host_bytes = self.params.flat.nbytes * 8 + sum(v.nbytes for v in self.optimizer.state().values())
        self._push()

    @property
    def modules(self) -> list[adalora.AdaLoraModule]:
        return self.params.modules

    def _push(self) -> None:
        self.inner.load_lora_state(adalora.effective_lora(self.params, self.c, peft_key))

    def rank_map(self) -> tuple[tuple[int, ...], ...]:
        """Ranks kept, [layer][target] in target order."""
        ranks = self.allocator.ranks().reshape(self.spec.layers, len(self.lora.targets))
        return tuple(tuple(int(r) for r in row) for row in ranks)

    def kept(self) -> np.ndarray | None:
        """The rank pattern [modules, init_r], or None before the first masking (PEFT's rank_pattern None)."""
        return self.allocator.kept.copy() if self.allocator.has_pattern else None

    def params_before_update(self) -> adalora.AdaLoraParams:
        return self.params.like(self.previous.copy())

    # -- the step ---------------------------------------------------------------------------------------------
    def train_step(self, micro_batches: Sequence[tuple[np.ndarray, np.ndarray]], lr: float,
                   max_grad_norm: float) -> PendingStep:
        loss, tokens, grads = self.inner.gradients(micro_batches)
        return self.apply_gradients(loss, tokens, grads, lr, max_grad_norm)

    def apply_gradients(self, ce: float, tokens: int, lora_grads: dict[str, np.ndarray], lr: float,
                        max_grad_norm: float) -> PendingStep:
        """The host's part of a step, from the backend's mean cross-entropy and its gradients of A_eff and B."""
        self.step_number += 1
        adalora.chain_gradients(self.params, self.grads, self.c, lora_grads, peft_key)
        loss = ce + adalora.orth_regulariser(self.params, self.settings.orth_reg_weight, self.grads)
        norm = global_grad_norm([self.grads.flat]) if np.isfinite(loss) else float("nan")
        if not (np.isfinite(loss) and np.isfinite(norm)):
            return PendingStep.done(AdaptiveStepResult(self.optimizer.step_count, loss, tokens, norm, True,
                                                       self.rank_map()))
        np.copyto(self.previous, self.params.flat)
        scale = clip_scale(norm, max_grad_norm)
        if scale != 1.0:
            self.grads.flat *= np.float32(scale)       # the allocator scores with the clipped gradients
        np.copyto(self._step_grads, self.grads.flat)    # the optimizer scales its gradient vector in place
        self.optimizer.step_flat(self.params.flat, self._step_grads, lr)
        self.allocator.update_and_allocate(self.step_number, self.grads.flat)
        self._push()
        return PendingStep.done(AdaptiveStepResult(self.optimizer.step_count, loss, tokens, norm, False,
                                                   self.rank_map()))

    # -- the rest of the contract -------------------------------------------------------------------------------
    def eval_loss(self, input_ids, labels):
        return self.inner.eval_loss(input_ids, labels)

    def logits(self, input_ids):
        return self.inner.logits(input_ids)

    def lora_state(self) -> dict[str, np.ndarray]:
        return adalora.effective_lora(self.params, self.c, peft_key)

    def lora_state_before_update(self) -> dict[str, np.ndarray]:
        return adalora.effective_lora(self.params_before_update(), self.c, peft_key)

    def load_lora_state(self, state: dict[str, np.ndarray]) -> None:
        raise ValueError("an AdaLoRA run's adapter is its A, E, B triplets: load them with the optimizer state "
                         "(load_optimizer_state) or start from them (init=)")

    def optimizer_state(self) -> dict[str, np.ndarray]:
        own = {"params": self.params.flat.copy(), "previous": self.previous.copy(),
               "step_number": np.array(self.step_number, np.int64), **self.allocator.state()}
        return {**self.optimizer.state(), **{STATE_PREFIX + k: v for k, v in own.items()}}

    def load_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        own = {k[len(STATE_PREFIX):]: v for k, v in state.items() if k.startswith(STATE_PREFIX)}
        if not own:
            raise ValueError("this checkpoint holds no AdaLoRA state (a plain LoRA run's?); resume it without "
                             "adaptive rank")
        flat = np.asarray(own["params"], np.float32)
        if flat.shape != self.params.flat.shape:
            raise ValueError(f"AdaLoRA state holds {flat.size} values; this model and init_r need "
                             f"{self.params.flat.size}")
        self.params.flat[...] = flat
        self.previous[...] = own["previous"]
        self.step_number = int(own["step_number"])
        self.allocator.load_state(own)
        self.optimizer.load_state({k: v for k, v in state.items() if not k.startswith(STATE_PREFIX)})
        self._push()

    def memory_bytes(self) -> int:
        return self.inner.memory_bytes() + self._host_bytes

    def close(self) -> None:
        self.inner.close()





def folded_lora(backend: AdaptiveRankBackend, before_update: bool = False
                ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The run's AdaLoRA adapter as an ordinary LoRA (PEFT names) and its rank per module path, as PEFT's LoRA
    rank_pattern takes it: the kept triplets folded into A and B (engine.lora.adalora.fold_to_lora)."""
    params = backend.params_before_update() if before_update else backend.params
    return adalora.fold_to_lora(params, backend.allocator.kept, backend.lora.alpha, peft_key)


def export_adaptive(folder: str | Path, backend: AdaptiveRankBackend, base_model: str, card: dict,
                    before_update: bool = False) -> Path:
    """Write the AdaLoRA adapter into `folder` (PEFT's AdaLoraModel.save_pretrained layout) and the folded
    per-module-rank LoRA into folder/FOLDED_DIR (what the GGUF export and llama.cpp take)."""
    params = backend.params_before_update() if before_update else backend.params
    ranks = backend.allocator.ranks()
    card = {**card, "final ranks": f"{int(ranks.sum())} in all over {len(ranks)} projections "
                                   f"(target {backend.settings.target_r * len(ranks)})"}
    export_adalora_adapter(folder, params, backend.kept(), backend.settings, backend.lora.alpha,
                           backend.lora.targets, base_model, card)
    state, rank_pattern = folded_lora(backend, before_update)
    folded = Path(folder) / FOLDED_DIR
    folded.mkdir(exist_ok=True)
    export_adapter(folded, state, backend.lora, base_model, card, rank_pattern=rank_pattern,
                   adaptive=backend.settings)
    return Path(folder)
