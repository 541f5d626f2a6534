"""One training run from the window, without widgets: prepare, hand the GPU over from chat, train, report.

The run goes through the same `engine.runs.prepare_run` as `lora-lab train`, inside `Handover.train`, so the chat
model is unloaded while training holds the device and comes back with the new adapter active. The coroutine runs
on its own asyncio loop in a worker thread: the window's event loop only ever receives signals, so it never
waits on training (and tests need no special event loop).
"""
from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import QObject, Signal

from app.workers import run_in_thread
from engine.handover import Handover
from engine.train_config import TrainConfig
from engine.trainer import TrainerCallback, eval_loss


@dataclass(frozen=True)
class RunRequest:
    """What the wizard decided: everything `prepare_run` needs, plus where the adapter goes."""

    model: str
    files: tuple[str, ...]
    val_split: float
    config: TrainConfig
    out_dir: Path
    backend: str = "auto"           # auto | cpu | wgpu | wgpu:<adapter>
    mask_prompt: bool | None = None
    packing: bool = False


@dataclass(frozen=True)
class Perplexities:
    before: float | None            # the base model (LoRA B = 0) on the validation batches
    after: float | None             # the trained adapter on the same batches
    tokens: int


class _Bridge(QObject):
    """Trainer callbacks arrive on the training thread; these signals carry them to the GUI thread."""

    step = Signal(object)
    evaluated = Signal(object)
    checkpointed = Signal(object)
    log = Signal(str)
    before = Signal(float, int)


class _Callback(TrainerCallback):
    def __init__(self, bridge: _Bridge):
        self.bridge = bridge

    def on_step(self, event):
        self.bridge.step.emit(event)

    def on_eval(self, event):
        self.bridge.evaluated.emit(event)

    def on_checkpoint(self, event):
        self.bridge.checkpointed.emit(event)

    def on_failure(self, step, message):
        self.bridge.log.emit(f"training failed at step {step}: {message}")


class TrainingController(QObject):
    started = Signal(object)        # RunRequest
    step = Signal(object)           # engine.trainer.StepEvent
    evaluated = Signal(object)      # EvalEvent
    checkpointed = Signal(object)   # CheckpointEvent
    log = Signal(str)
    finished = Signal(object, object)   # TrainSummary, Perplexities
    failed = Signal(str, str)
    running_changed = Signal(bool)

    def __init__(self, handover: Handover, parent=None):
        super().__init__(parent)
        self.handover = handover
        self.request: RunRequest | None = None
        self.summary = None
        self._trainer = None
        self._running = False
        self._before: tuple[float, int] | None = None
        self._bridge = _Bridge()
        self._bridge.step.connect(self.step)
        self._bridge.evaluated.connect(self.evaluated)
        self._bridge.checkpointed.connect(self.checkpointed)
        self._bridge.log.connect(self.log)
        self._bridge.before.connect(self._on_before)

    @property
    def running(self) -> bool:
        return self._running

    def _on_before(self, loss: float, tokens: int) -> None:
        self._before = (loss, tokens)
        self.log.emit(f"validation loss before training (base model): {loss:.4f}, "
                      f"perplexity {_perplexity(loss):.3f} over {tokens} tokens")

    # -- control ------------------------------------------------------------------------------------------------
    def start(self, request: RunRequest) -> None:
        if self._running:
            self.failed.emit("a training run is already in progress; stop it first", "")
            return
        self.request, self.summary, self._before, self._trainer = request, None, None, None
        self._running = True
        self.running_changed.emit(True)
        self.started.emit(request)
        self.log.emit(f"training {request.model} on {len(request.files)} file(s) into {request.out_dir}")
        run_in_thread(self, self._work, request, on_result=self._on_finished, on_error=self._on_failed,
                      on_done=self._on_done)

    def pause(self) -> None:
        if self._trainer is not None:
            self._trainer.pause()
            self.log.emit("paused (after the step in flight)")

    def resume(self) -> None:
        if self._trainer is not None:
            self._trainer.resume()
            self.log.emit("resumed")

    def stop(self) -> None:
        if self._trainer is not None:
            self._trainer.stop()
            self.log.emit("stopping after the step in flight; the adapter so far is saved")

    @property
    def paused(self) -> bool:
        return self._trainer is not None and self._trainer.paused

    # -- the run (worker thread) ----------------------------------------------------------------------------------
    def _work(self, request: RunRequest):
        return asyncio.run(self.handover.train(lambda: self._train(request)))

    def _train(self, request: RunRequest):
        from engine.runs import RunInputs, backend_factory, prepare_run, resolve_base

        bridge = self._bridge
        model_dir, _ = resolve_base(request.model, log=bridge.log.emit)
        inner = backend_factory(request.backend, model_dir,
                                on_choice=lambda choice: [bridge.log.emit(line) for line in choice.lines()])
        holder = {}

        def factory(lora, optim, batch_size, seq_len, seed=0, init_state=None):
            backend = inner(lora, optim, batch_size, seq_len, seed=seed, init_state=init_state)
            bridge.log.emit(f"training backend: {backend.name}")
            val = holder.get("val")
            if init_state is None and val:
                # A fresh adapter starts with B = 0, so this is exactly the base model on the validation data.
                loss, tokens = eval_loss(backend, val)
                bridge.before.emit(loss, tokens)
            return backend

        inputs = RunInputs(model=request.model, data=request.files, val_split=request.val_split,
                           mask_prompt=request.mask_prompt, packing=request.packing, backend=request.backend)
        prepared = prepare_run(request.config, inputs, request.out_dir, callback=_Callback(bridge), factory=factory,
                               log=bridge.log.emit)
        holder["val"] = prepared.trainer.val
        self._trainer = prepared.trainer
        return prepared.trainer.run()

    # -- results (GUI thread) --------------------------------------------------------------------------------------
    def _on_finished(self, summary) -> None:
        self.summary = summary
        before = self._before
        perplexities = Perplexities(_perplexity(before[0]) if before else None, summary.eval_perplexity,
                                    before[1] if before else 0)
        self.log.emit(f"{'stopped' if summary.stopped else 'finished'}: {summary.steps}/{summary.total_steps} "
                      f"steps in {summary.elapsed_s:.1f} s; adapter saved in {summary.adapter_dir}")
        self.finished.emit(summary, perplexities)

    def _on_failed(self, message: str, detail: str) -> None:
        self.failed.emit(message, detail)

    def _on_done(self) -> None:
        self._running = False
        self._trainer = None
        self.running_changed.emit(False)


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf
