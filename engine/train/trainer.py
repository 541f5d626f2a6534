"""The headless trainer: schedules, accumulation, evaluation, checkpoints and the non-finite guard.

A backend (engine.backends.base.TrainingBackend) does the arithmetic; the trainer decides what each step sees and at
which learning rate, reads results one step late (so a GPU backend stays busy), and reports through a callback
object. `pause()`, `resume()` and `stop()` may be called from another thread; they take effect between steps.
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from engine.lora.peft_write import export_adapter
from engine.backends.base import PendingStep, TrainingBackend
from engine.backends.preference import PreferenceLoss, PreferenceObjective, join_pairs, preference_loss
from engine.train.adaptive import AdaptiveRankBackend, export_adaptive
from engine.train.checkpoint import Checkpoint, checkpoint_root, list_checkpoints, save_checkpoint
from engine.train.schedule import Schedule
from engine.train.config import TrainConfig
from engine.train.lock import RunLock
from engine.train.reference import ReferenceLogps, choose_reference_mode
from engine.train.data import Batch, BatchSource

# factory(lora, optim, batch_size, seq_len, seed=, init_state=, memory=MemoryOptions) -> TrainingBackend
BackendFactory = Callable[..., TrainingBackend]


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says why and what was kept."""


class NonFiniteError(TrainingError):
    pass


@dataclass(frozen=True)
class StepEvent:
    step: int                # 1-based position in the run (skipped steps count)
    total: int
    epoch: int               # 0-based epoch the step's data came from
    loss: float
    lr: float
    grad_norm: float
    tokens: int              # counted tokens in this step
    tokens_per_s: float      # over the last few steps, measured
    elapsed_s: float         # since the run started (across resumes)
    eta_s: float
    memory_bytes: int        # backend.memory_bytes(), measured
    skipped: bool
    reward_margin: float | None = None     # DPO/ORPO: mean chosen − rejected reward (None for SFT)
    reward_accuracy: float | None = None   # DPO/ORPO: fraction of pairs whose chosen reward is the larger
    # AdaLoRA: ranks kept, [layer][target] in TrainConfig.lora.targets order (None for plain LoRA)
    rank_map: tuple[tuple[int, ...], ...] | None = None


@dataclass(frozen=True)
class EvalEvent:
    step: int
    loss: float
    perplexity: float        # NaN for DPO/ORPO, whose loss is not a token cross-entropy
    tokens: int
    elapsed_s: float
    reward_margin: float | None = None     # DPO/ORPO, over every validation pair
    reward_accuracy: float | None = None


@dataclass(frozen=True)
class CheckpointEvent:
    step: int
    path: Path


@dataclass
class TrainSummary:
    steps: int
    total_steps: int
    applied_steps: int
    skipped_steps: list[int]
    first_loss: float | None
    final_loss: float | None       # mean over the last (up to) 10 applied steps
    eval_loss: float | None
    eval_perplexity: float | None
    tokens: int
    elapsed_s: float
    adapter_dir: Path
    checkpoint: Path | None
    stopped: bool                  # stopped on request before the end
    backend: str                   # the backend's name, e.g. "cpu: onnxruntime"
    losses: list[float] = field(default_factory=list)   # every applied step's training loss, in order
    lora_state: dict[str, np.ndarray] = field(repr=False, default_factory=dict)

    def to_json(self) -> dict:
        return {"event": "summary", "steps": self.steps, "total_steps": self.total_steps,
                "applied_steps": self.applied_steps, "skipped_steps": self.skipped_steps,
                "first_loss": self.first_loss, "final_loss": self.final_loss, "eval_loss": self.eval_loss,
                "eval_perplexity": self.eval_perplexity, "tokens": self.tokens, "elapsed_s": self.elapsed_s,
                "adapter_dir": str(self.adapter_dir), "checkpoint": str(self.checkpoint) if self.checkpoint else None,
                "stopped": self.stopped, "backend": self.backend}


class TrainerCallback:
    """Override what you need; every method is called on the trainer's thread."""

    def on_step(self, event: StepEvent) -> None: ...
    def on_eval(self, event: EvalEvent) -> None: ...
    def on_checkpoint(self, event: CheckpointEvent) -> None: ...
    def on_finish(self, summary: TrainSummary) -> None: ...
    def on_failure(self, step: int, message: str) -> None: ...
    def on_paused(self, step: int) -> None: ...     # a pause took effect: steps up to `step` are done, no more run


@dataclass
class _Position:
    """Where the run is: the checkpoint stores exactly this (plus RNG state) to continue on the same batch."""
    step: int = 0            # steps attempted so far
    epoch: int = 0
    batch: int = 0           # next batch index within the epoch
    epoch_seed: int = 0


def run_steps(config: TrainConfig, batches_per_epoch: int) -> int:
    """Optimizer steps of a run: max_steps, or `epochs` passes of grad_accum micro-batches a step (the last
    step of an epoch takes what is left)."""
    return config.max_steps or config.epochs * math.ceil(batches_per_epoch / config.grad_accum)


def epoch_seed_generator(seed: int) -> np.random.Generator:
    """The run's generator of per-epoch shuffle seeds (a checkpoint stores its state)."""
    return np.random.default_rng(seed)


def next_epoch_seed(rng: np.random.Generator) -> int:
    """The shuffle seed of the next epoch: one draw per epoch, the first at the start of the run."""
    return int(rng.integers(2**31))


def eval_preference(backend: TrainingBackend, batches: Sequence[Batch], objective: PreferenceObjective,
                    reference_logps: ReferenceLogps | None = None) -> tuple[PreferenceLoss, int]:
    """The objective's loss and reward metrics over every pair of `batches` at once (the policy's and, for DPO,
    the reference's sequence log-probabilities: from `reference_logps` when given, a cache, else a pass each),
    and the completion tokens counted."""
    logps, counts, reference = [], [], []
    for ids, labels in batches:
        s, n = backend.sequence_logps(ids, labels)
        logps.append(s)
        counts.append(n)
        if objective.needs_reference:
            reference.append(reference_logps(ids, labels) if reference_logps is not None else
                             backend.sequence_logps(ids, labels, adapter=False)[0])
    counted = join_pairs(counts)
    result = preference_loss(objective, join_pairs(logps), counted, join_pairs(reference) if reference else None)
    return result, int(counted.sum())


def eval_loss(backend: TrainingBackend, batches: Sequence[Batch]) -> tuple[float, int]:
    """Mean token cross-entropy over `batches` and the tokens counted."""
    total, count = 0.0, 0
    for ids, labels in batches:
        s, n = backend.eval_loss(ids, labels)
        total, count = total + s, count + n
    return (total / count if count else float("nan")), count


class Trainer:
    def __init__(self, config: TrainConfig, backend_factory: BackendFactory, train: BatchSource,
                 out_dir: str | Path, base_model: str, val: Sequence[Batch] = (),
                 callback: TrainerCallback | None = None, init_state: dict[str, np.ndarray] | None = None,
                 resume: Checkpoint | None = None, card: dict | None = None, inputs: dict | None = None,
                 lock: RunLock | None = None):
        # First, before looking at the folder: one run per output folder (engine.train.lock). prepare_run takes
        # the lock before reading the corpus and hands it over; run() releases it when the run ends.
        self._lock = lock if lock is not None else RunLock(out_dir)
        self._lock.acquire()
        self.total_steps = run_steps(config, train.batches_per_epoch)
        if config.adaptive_rank is not None and config.adaptive_rank.total_step == 0:
            # AdaLoRA's budget schedule ends at total_step − tfinal: 0 means "the run's length", known only now.
            config = replace(config, adaptive_rank=replace(config.adaptive_rank, total_step=self.total_steps))
        self.config = config
        self.train, self.val = train, list(val)
        self.out_dir, self.base_model = Path(out_dir), base_model
        self.callback = callback or TrainerCallback()
        self.card = dict(card or {})
        self.inputs = dict(inputs or {})     # what the run was made from (files, data settings), for resuming
        self.schedule = Schedule(lr=config.lr, total_steps=self.total_steps, kind=config.schedule,
                                 warmup_steps=min(config.warmup_steps, self.total_steps))
        self._running, self._stop = threading.Event(), threading.Event()
        self._running.set()
        self._rng = epoch_seed_generator(config.seed)
        self._pos = _Position()
        self._skipped: list[int] = []
        self._in_a_row = 0
        self._losses: list[float] = []
        self._tokens = 0
        self._elapsed_before = 0.0
        self._last_eval: tuple[float, float] | None = None
        self._resume = resume
        if resume is not None:
            self._restore(resume)
            init_state = resume.lora_state
        else:
            existing = list_checkpoints(checkpoint_root(self.out_dir))
            if existing:
                raise TrainingError(f"{self.out_dir} already holds checkpoints of a run ({existing[-1].name}); "
                                    "resume it, or choose an empty output folder")
            self._pos.epoch_seed = next_epoch_seed(self._rng)
        self._init_state = init_state
        self._objective = config.preference_objective()     # None: supervised
        # DPO's reference log-probabilities: cached per pair or a pass every micro-batch (engine.train.reference);
        # `reference` is made once the backend is built.
        self.reference_mode: str | None = None
        if self._objective is not None and self._objective.needs_reference:
            evaluations = 0 if not self.val else \
                1 + ((self.total_steps - 1) // config.eval_every if config.eval_every else 0)
            self.reference_mode = choose_reference_mode(config.reference_logps, self.total_steps, config.grad_accum,
                                                        train.batches_per_epoch, evaluations)
        self.reference: ReferenceLogps | None = None
        self._factory = backend_factory
        self.backend: TrainingBackend | None = None

    # -- control, from any thread -------------------------------------------------------------------------
    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def stop(self) -> None:
        self._stop.set()
        self._running.set()

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    # -- the run ------------------------------------------------------------------------------------------
    def run(self) -> TrainSummary:
        try:
            c = self.config
            adaptive = c.adaptive_rank
            self.backend = self._factory(c.lora, c.optim, c.batch_size, c.seq_len, seed=c.seed,
                                         init_state=None if adaptive else self._init_state,
                                         memory=c.memory_options())
            if adaptive is not None:
                # AdaLoRA on the host over the backend's LoRA (engine.train.adaptive); `init_state` of a fresh run
                # holds A, E, B under PEFT's AdaLoRA names, a resumed run's come with the optimizer state below.
                self.backend = AdaptiveRankBackend(self.backend, adaptive, c.optim, seed=c.seed,
                                                   init=None if self._resume is not None else self._init_state)
            self.card.setdefault("backend", self.backend.name)
            if self.reference_mode is not None:
                backend = self.backend
                self.reference = ReferenceLogps(lambda ids, labels: backend.sequence_logps(ids, labels, False)[0],
                                                 cached=self.reference_mode == "cached")
            if self._resume is not None:
                self.backend.load_optimizer_state(self._resume.optimizer_state)
            summary = self._loop()
        except BaseException as exc:
            message = str(exc) if isinstance(exc, TrainingError) else f"{type(exc).__name__}: {exc}"
            self.callback.on_failure(self._pos.step, message)
            raise
        finally:
            if self.backend is not None:
                self.backend.close()
            self._lock.abandon()      # a run that wrote nothing leaves no folder behind
        self.callback.on_finish(summary)
        return summary

    def _loop(self) -> TrainSummary:
        c = self.config
        self._start = time.perf_counter()
        self._window: deque[tuple[float, int]] = deque(maxlen=10)   # (seconds, tokens) of recent steps
        self._last_done = self._start
        pending: deque[tuple[int, int, float, PendingStep]] = deque()
        batches = None
        stopped = False
        while self._pos.step < self.total_steps:
            if self._stop.is_set() or not self._running.is_set():
                self._drain(pending)
                if not self._running.is_set() and not self._stop.is_set():
                    self.callback.on_paused(self._pos.step)
                self._running.wait()
                if self._stop.is_set():
                    stopped = True
                    break
                self._last_done = time.perf_counter()     # a pause is not step time
            if batches is None:
                batches = iter(self.train.epoch_batches(self._pos.epoch, self._pos.epoch_seed, self._pos.batch))
            micro, epoch = [], self._pos.epoch
            while len(micro) < c.grad_accum and self._pos.batch < self.train.batches_per_epoch:
                micro.append(next(batches))
                self._pos.batch += 1
            if self._pos.batch >= self.train.batches_per_epoch:
                self._pos.epoch, self._pos.batch = self._pos.epoch + 1, 0
                self._pos.epoch_seed = next_epoch_seed(self._rng)
                batches = None
            if self._in_a_row + len(pending) >= c.max_nonfinite_in_a_row:
                # The steps still in flight could complete the non-finite streak: read them before submitting
                # another, so the run stops exactly at max_nonfinite_in_a_row, not one step past it.
                self._drain(pending)
            lr = self.schedule.lr_at(self._pos.step)
            if self._objective is None:
                result = self.backend.train_step(micro, lr, c.max_grad_norm)
            else:
                reference = None if self.reference is None else [self.reference(i, l) for i, l in micro]
                result = self.backend.preference_step(micro, self._objective, lr, c.max_grad_norm, reference)
            pending.append((self._pos.step + 1, epoch, lr, result))
            self._pos.step += 1
            while len(pending) > 1:       # read results one step late
                self._finish_step(*pending.popleft())
            self._guard(pending)
            step = self._pos.step
            if c.eval_every and step % c.eval_every == 0 and step < self.total_steps and self.val:
                self._drain(pending)
                self._evaluate()
                self._last_done = time.perf_counter()     # nor is evaluating
            if c.save_every and step % c.save_every == 0 and step < self.total_steps:
                self._drain(pending)
                self._checkpoint()
                self._last_done = time.perf_counter()
        self._drain(pending)
        if self._in_a_row:
            # The last steps were non-finite: the adapter now is the one whose forward produced them.
            self._abort_non_finite()
        if self.val and (self._last_eval is None or self._last_eval[0] != self._pos.step):
            self._evaluate()
        checkpoint = self._checkpoint()
        summary = self._summary(checkpoint, stopped)
        if isinstance(self.backend, AdaptiveRankBackend):
            export_adaptive(self.out_dir, self.backend, self.base_model, self._card(summary))
        else:
            export_adapter(self.out_dir, summary.lora_state, c.lora, self.base_model, self._card(summary))
        return summary

    def _drain(self, pending) -> None:
        while pending:
            self._finish_step(*pending.popleft())
        self._guard(pending)

    def _guard(self, pending) -> None:
        """Stop the run after too many non-finite steps in a row, once every submitted step is accounted for."""
        if self._in_a_row >= self.config.max_nonfinite_in_a_row:
            while pending:
                self._finish_step(*pending.popleft())
            if self._in_a_row >= self.config.max_nonfinite_in_a_row:
                self._abort_non_finite()

    def _finish_step(self, step: int, epoch: int, lr: float, pending: PendingStep) -> None:
        result = pending.result()
        now = time.perf_counter()
        self._window.append((now - self._last_done, result.tokens))
        self._last_done = now
        seconds = sum(s for s, _ in self._window)
        per_step = seconds / len(self._window)
        if result.skipped:
            self._skipped.append(step)
            self._in_a_row += 1
        else:
            self._in_a_row = 0
            self._losses.append(result.loss)
            self._tokens += result.tokens
        self.callback.on_step(StepEvent(
            step=step, total=self.total_steps, epoch=epoch, loss=result.loss, lr=lr, grad_norm=result.grad_norm,
            tokens=result.tokens, tokens_per_s=sum(t for _, t in self._window) / seconds if seconds > 0 else 0.0,
            elapsed_s=self._elapsed(), eta_s=per_step * (self.total_steps - step),
            memory_bytes=self.backend.memory_bytes(), skipped=result.skipped,
            reward_margin=getattr(result, "reward_margin", None),       # a PreferenceStepResult's metrics
            reward_accuracy=getattr(result, "reward_accuracy", None),
            rank_map=getattr(result, "rank_map", None)))           # an AdaLoRA step's ranks kept
        self._last_lr = lr

    def _abort_non_finite(self) -> None:
        """Stop, keeping the adapter from before the last applied update: that update's step found its forward
        and backward finite, while the weights it made are the ones whose forward just failed (at a huge
        learning rate they overflow). It is written to the output folder; no checkpoint of the bad state is."""
        bad, lr = self._skipped[-self._in_a_row:], self._last_lr
        skipped = set(self._skipped)
        applied = [s for s in range(1, self._pos.step + 1) if s not in skipped]
        steps = f"step{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))}"
        streak = "in a row" if len(bad) >= self.config.max_nonfinite_in_a_row else "at the end of the run"
        stopped = f"training stopped: the loss or gradient was NaN/inf at {steps} {streak} (learning rate {lr:.3g})"
        advice = "Lower the learning rate or check the data."
        if not applied:
            raise NonFiniteError(f"{stopped}; no step was applied, so no adapter was written. {advice}")
        kept_after = applied[-2] if len(applied) > 1 else 0
        what = f"after step {kept_after}" if kept_after else "the adapter the run started from"
        card = {"base model": self.base_model, **self.card,
                "stopped": f"non-finite loss or gradient at {steps}; this is the adapter {what}, the last whose "
                           f"forward and backward passes were finite (step {applied[-1]}'s update is dropped)"}
        if isinstance(self.backend, AdaptiveRankBackend):
            export_adaptive(self.out_dir, self.backend, self.base_model, card, before_update=True)
        else:
            export_adapter(self.out_dir, self.backend.lora_state_before_update(), self.config.lora, self.base_model,
                           card)
        raise NonFiniteError(
            f"{stopped}. The last adapter whose forward and backward passes were finite ({what}; step "
            f"{applied[-1]}'s update is dropped, since its weights are the ones that overflowed) is saved in "
            f"{self.out_dir}. {advice}")

    def _evaluate(self) -> None:
        if self._objective is not None:
            result, tokens = eval_preference(self.backend, self.val, self._objective, self.reference)
            self._last_eval = (self._pos.step, result.loss)
            self.callback.on_eval(EvalEvent(self._pos.step, result.loss, math.nan, tokens, self._elapsed(),
                                            result.reward_margin, result.reward_accuracy))
            return
        loss, tokens = eval_loss(self.backend, self.val)
        perplexity = math.exp(loss) if loss < 700 else math.inf
        self._last_eval = (self._pos.step, loss)
        self.callback.on_eval(EvalEvent(self._pos.step, loss, perplexity, tokens, self._elapsed()))

    def _elapsed(self) -> float:
        return self._elapsed_before + time.perf_counter() - self._start

    # -- checkpoints --------------------------------------------------------------------------------------
    def _state(self) -> dict:
        return {
            "config": self.config.to_dict(), "base_model": self.base_model,
            "schedule": {"kind": self.schedule.kind, "lr": self.schedule.lr, "total_steps": self.total_steps,
                         "warmup_steps": self.schedule.warmup_steps, "position": self._pos.step},
            "data": {"epoch": self._pos.epoch, "batch": self._pos.batch, "epoch_seed": self._pos.epoch_seed,
                     "batches_per_epoch": self.train.batches_per_epoch, "fingerprint": self.train.fingerprint},
            "rng": self._rng.bit_generator.state,
            "progress": {"step": self._pos.step, "skipped_steps": self._skipped, "in_a_row": self._in_a_row,
                         "losses": self._losses, "tokens": self._tokens, "elapsed_s": self._elapsed(),
                         "last_eval": self._last_eval},
            "card": self.card, "inputs": self.inputs,
        }

    def _restore(self, checkpoint: Checkpoint) -> None:
        state = checkpoint.trainer_state
        data = state["data"]
        if data["fingerprint"] != self.train.fingerprint or data["batches_per_epoch"] != self.train.batches_per_epoch:
            raise TrainingError(f"{checkpoint.path}: the training data differs from the data this run was "
                                "started with; resume with the same files and settings")
        if state["schedule"]["total_steps"] != self.total_steps:
            raise TrainingError(f"{checkpoint.path}: the run had {state['schedule']['total_steps']} steps, "
                                f"these settings give {self.total_steps}")
        self._pos = _Position(step=state["progress"]["step"], epoch=data["epoch"], batch=data["batch"],
                              epoch_seed=data["epoch_seed"])
        self._rng.bit_generator.state = state["rng"]
        progress = state["progress"]
        self._skipped, self._in_a_row = list(progress["skipped_steps"]), progress["in_a_row"]
        self._losses, self._tokens = list(progress["losses"]), progress["tokens"]
        self._elapsed_before = progress["elapsed_s"]
        self._last_eval = tuple(progress["last_eval"]) if progress["last_eval"] else None
        self.card = {**state.get("card", {}), **self.card}

    def _checkpoint(self) -> Path:
        path = save_checkpoint(checkpoint_root(self.out_dir), self._pos.step, self.config.lora,
                               self.backend.lora_state(), self.backend.optimizer_state(), self._state(),
                               self.base_model, self.config.keep_checkpoints)
        self.callback.on_checkpoint(CheckpointEvent(self._pos.step, path))
        return path

    def _summary(self, checkpoint: Path | None, stopped: bool) -> TrainSummary:
        last = self._losses[-10:]
        return TrainSummary(
            steps=self._pos.step, total_steps=self.total_steps,
            applied_steps=self._pos.step - len(self._skipped), skipped_steps=list(self._skipped),
            first_loss=self._losses[0] if self._losses else None,
            final_loss=float(np.mean(last)) if last else None,
            eval_loss=self._last_eval[1] if self._last_eval else None,
            eval_perplexity=math.exp(self._last_eval[1]) if self._last_eval and self._last_eval[1] < 700
            and self._objective is None else None,
            tokens=self._tokens, elapsed_s=self._elapsed(), adapter_dir=self.out_dir, checkpoint=checkpoint,
            stopped=stopped, backend=self.backend.name, losses=list(self._losses),
            lora_state=self.backend.lora_state())

    def _card(self, summary: TrainSummary) -> dict:
        c = self.config
        card = {"base model": self.base_model, **self.card,
                "steps": f"{summary.steps} of {summary.total_steps}" + (" (stopped early)" if summary.stopped else ""),
                "tokens trained": summary.tokens, "learning rate": f"{c.lr:g}, {c.schedule}, {c.warmup_steps} warmup",
                "optimizer": f"{c.optim.name}, weight decay {c.optim.weight_decay:g}",
                "gradient clipping": c.max_grad_norm or "off",
                "batch": f"{c.batch_size} x {c.grad_accum} accumulation x {c.seq_len} tokens", "seed": c.seed}
        if summary.first_loss is not None:
            card["training loss"] = f"{summary.first_loss:.4f} -> {summary.final_loss:.4f}"
        if summary.eval_loss is not None:
            card["validation loss"] = f"{summary.eval_loss:.4f}" + (
                f" (perplexity {summary.eval_perplexity:.3f})" if summary.eval_perplexity is not None else "")
        if self._objective is not None:
            o = self._objective
            how = "its log-probabilities cached per pair" if self.reference_mode == "cached" else \
                "a forward pass every step"
            card["objective"] = f"dpo, beta {o.beta:g}, label smoothing {o.label_smoothing:g}, reference: the base " \
                                f"model (adapter off), {how}" if o.name == "dpo" else f"orpo, lambda {o.orpo_lambda:g}"
        if c.adaptive_rank is not None:
            a = c.adaptive_rank
            card["adaptive rank"] = (f"AdaLoRA, init_r {a.init_r} -> target_r {a.target_r}, tinit {a.tinit}, "
                                     f"tfinal {a.tfinal}, deltaT {a.deltaT}, total_step {a.total_step}")
        if summary.skipped_steps:
            card["skipped non-finite steps"] = summary.skipped_steps
        card["training time"] = f"{summary.elapsed_s:.1f} s"
        return card
