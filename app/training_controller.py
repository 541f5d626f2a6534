"""One training run from the window, without widgets: prepare, hand the GPU over from chat, train, report.

The run goes through the same `engine.train.runs.prepare_run` as `lora-lab train`, in a child process
(app.training_process), inside `Handover.train`, so the chat model is unloaded while training holds the device and
comes back with the new adapter active. The coroutine runs on its own asyncio loop in a worker thread: the window's
event loop only ever receives signals, so it never waits on training (and tests need no special event loop).
"""
from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import QObject, Signal

from app.training_process import TrainingProcess
from app.workers import run_in_thread
from engine.chat.handover import Handover
from engine.train.config import TrainConfig
from engine.train.recommend import training_advice


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
    """Events arrive on the worker thread that waits for the training process; these signals carry them to the
    GUI thread."""

    step = Signal(object)
    evaluated = Signal(object)
    checkpointed = Signal(object)
    log = Signal(str)
    phase = Signal(str)
    paused = Signal(int)
    before = Signal(float, int)


class TrainingController(QObject):
    started = Signal(object)        # RunRequest
    step = Signal(object)           # engine.train.trainer.StepEvent
    evaluated = Signal(object)      # EvalEvent
    checkpointed = Signal(object)   # CheckpointEvent
    log = Signal(str)
    phase = Signal(str)             # what the run is doing before its first step (reading, measuring, ...)
    paused_changed = Signal(bool)   # True once a pause took effect (the steps already started have finished)
    finished = Signal(object, object)   # TrainSummary, Perplexities
    failed = Signal(str, str)
    running_changed = Signal(bool)

    def __init__(self, handover: Handover, parent=None):
        super().__init__(parent)
        self.handover = handover
        self.request: RunRequest | None = None
        self.summary = None
        self.advice: list[str] = []     # what to change when the last run under-fitted (engine.train.recommend)
        self._process: TrainingProcess | None = None
        self._running = False
        self._paused = False
        self._before: tuple[float, int] | None = None
        self._bridge = _Bridge()
        self._bridge.step.connect(self.step)
        self._bridge.evaluated.connect(self.evaluated)
        self._bridge.checkpointed.connect(self.checkpointed)
        self._bridge.log.connect(self.log)
        self._bridge.phase.connect(self._on_phase)
        self._bridge.paused.connect(self._on_paused)
        self._bridge.before.connect(self._on_before)

    @property
    def running(self) -> bool:
        return self._running

    def _on_paused(self, step: int) -> None:
        if self._paused:          # not a pause overtaken by resume or stop
            self.log.emit(f"paused after step {step}")
            self.paused_changed.emit(True)

    def _on_phase(self, text: str) -> None:
        self.log.emit(text + "…")
        self.phase.emit(text)

    def _on_before(self, loss: float, tokens: int) -> None:
        self._before = (loss, tokens)
        self.log.emit(f"validation loss before training (base model): {loss:.4f}, "
                      f"perplexity {_perplexity(loss):.3f} over {tokens} tokens")

    # -- control ------------------------------------------------------------------------------------------------
    def start(self, request: RunRequest) -> None:
        if self._running:
            self.failed.emit("a training run is already in progress; stop it first", "")
            return
        self.request, self.summary, self._before, self._paused = request, None, None, False
        self.advice: list[str] = []
        self._process = TrainingProcess(request, self._relay)
        self._running = True
        self.running_changed.emit(True)
        self.started.emit(request)
        self.log.emit(f"training {request.model} on {len(request.files)} file(s) into {request.out_dir}")
        run_in_thread(self, self._work, self._process, on_result=self._on_finished, on_error=self._on_failed,
                      on_done=self._on_done)

    def pause(self) -> None:
        if self._process is not None and not self._paused:
            self._process.send("pause")
            self._paused = True
            self.log.emit("pausing: the steps already started finish first")

    def resume(self) -> None:
        if self._process is not None and self._paused:
            self._process.send("resume")
            self._paused = False
            self.log.emit("resumed")
            self.paused_changed.emit(False)

    def stop(self) -> None:
        if self._process is not None:
            self._process.send("stop")
            self._paused = False
            self.log.emit("stopping after the step in flight; the adapter so far is saved")

    @property
    def paused(self) -> bool:
        return self._paused

    # -- the run (worker thread) ----------------------------------------------------------------------------------
    def _work(self, process: TrainingProcess):
        # The chat unloads, the child process trains (and frees its device when it exits), chat comes back.
        return asyncio.run(self.handover.train(process.run))

    def _relay(self, kind: str, *payload) -> None:
        """Events from the training process (worker thread) become signals (queued to the GUI thread)."""
        bridge = self._bridge
        {"step": bridge.step, "eval": bridge.evaluated, "checkpoint": bridge.checkpointed, "log": bridge.log,
         "before": bridge.before, "phase": bridge.phase, "paused": bridge.paused}[kind].emit(*payload)

    # -- results (GUI thread) --------------------------------------------------------------------------------------
    def _on_finished(self, summary) -> None:
        self._on_done()     # not running any more by the time listeners hear about the result
        self.summary = summary
        before = self._before
        perplexities = Perplexities(_perplexity(before[0]) if before else None, summary.eval_perplexity,
                                    before[1] if before else 0)
        self.log.emit(f"{'stopped' if summary.stopped else 'finished'}: {summary.steps}/{summary.total_steps} "
                      f"steps in {summary.elapsed_s:.1f} s; adapter saved in {summary.adapter_dir}")
        self.advice = training_advice(summary.losses, self.request.config, summary.stopped)
        for line in self.advice:
            self.log.emit(line)
        self.finished.emit(summary, perplexities)

    def _on_failed(self, message: str, detail: str) -> None:
        self._on_done()
        self.failed.emit(message, detail)

    def _on_done(self) -> None:
        if not self._running:
            return
        self._running = False
        self._paused = False
        self._process = None
        self.running_changed.emit(False)


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf
