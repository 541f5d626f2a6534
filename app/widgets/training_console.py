"""The training console: live loss (raw, smoothed) and validation loss, speed, progress, controls, log, checkpoints,
and the perplexity before and after when the run ends; for DPO/ORPO runs also the reward margin and the reward
accuracy, training and validation; for adaptive-rank (AdaLoRA) runs the rank map of the ranks kept. It shows the TrainingController's events, nothing else."""
from __future__ import annotations

from pathlib import Path

import pyqtgraph as pg
from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import (QFileDialog, QGridLayout, QHBoxLayout, QLabel, QListWidget, QPlainTextEdit,
                               QProgressBar, QPushButton, QSplitter, QVBoxLayout, QWidget)

from app.training_controller import TrainingController
from app.widgets.rank_map import RankMap
from engine.train.job import read_run_log

OTHER_RUN_COLORS = ("#31a354", "#756bb1", "#636363", "#d6616b")   # runs opened beside the live one
SMOOTHING = 0.9     # exponential moving average of the training loss (bias-corrected, as TensorBoard does)


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class LossPlot(pg.PlotWidget):
    def __init__(self, parent=None):
        super().__init__(parent, background="w")
        self.setObjectName("loss-plot")
        self.addLegend(offset=(-10, 10))
        self.showGrid(x=True, y=True, alpha=0.3)
        self.setLabel("bottom", "step")
        self.setLabel("left", "loss")
        self.raw = self.plot([], [], name="training loss", pen=pg.mkPen("#9ecae1", width=1))
        self.smooth = self.plot([], [], name="smoothed", pen=pg.mkPen("#08519c", width=2))
        self.val = self.plot([], [], name="validation loss", pen=pg.mkPen("#e6550d", width=2), symbol="o",
                             symbolSize=7, symbolBrush="#e6550d")
        # Fast runs deliver steps in bursts; redrawing at most every 100 ms keeps the event loop free.
        self._redraw_timer = QTimer(self, singleShot=True, interval=100)
        self._redraw_timer.timeout.connect(self._redraw)
        self.other_runs = []
        self.clear_data()

    def clear_data(self):
        self.steps, self.losses, self.smoothed, self.val_steps, self.val_losses = [], [], [], [], []
        self._ema, self._n = 0.0, 0
        self._redraw()

    def add_step(self, step: int, loss: float):
        self._ema, self._n = SMOOTHING * self._ema + (1 - SMOOTHING) * loss, self._n + 1
        self.steps.append(step)
        self.losses.append(loss)
        self.smoothed.append(self._ema / (1 - SMOOTHING ** self._n))
        if not self._redraw_timer.isActive():
            self._redraw_timer.start()

    def add_val(self, step: int, loss: float):
        self.val_steps.append(step)
        self.val_losses.append(loss)
        if not self._redraw_timer.isActive():
            self._redraw_timer.start()

    def add_run(self, name: str, run) -> None:
        """Another run's losses (engine.train.job.RunLog), dashed, beside the live run's; kept across clears."""
        color = OTHER_RUN_COLORS[len(self.other_runs) % len(OTHER_RUN_COLORS)]
        self.other_runs.append(self.plot(list(run.steps), list(run.losses), name=f"{name}: training loss",
                                         pen=pg.mkPen(color, width=1, style=Qt.DashLine)))
        if run.eval_steps:
            self.other_runs.append(self.plot(list(run.eval_steps), list(run.eval_losses), name=f"{name}: validation",
                                             pen=None, symbol="t", symbolSize=7, symbolBrush=color))

    def _redraw(self):
        self.raw.setData(self.steps, self.losses)
        self.smooth.setData(self.steps, self.smoothed)
        self.val.setData(self.val_steps, self.val_losses)


class RewardPlot(pg.PlotWidget):
    """DPO/ORPO: reward margin (left axis) and reward accuracy (0..1), per step and at each validation; hidden
    until an event carries them."""

    def __init__(self, parent=None):
        super().__init__(parent, background="w")
        self.setObjectName("reward-plot")
        self.addLegend(offset=(-10, 10))
        self.showGrid(x=True, y=True, alpha=0.3)
        self.setLabel("bottom", "step")
        self.setLabel("left", "reward margin / accuracy")
        self.margin = self.plot([], [], name="reward margin", pen=pg.mkPen("#08519c", width=1))
        self.accuracy = self.plot([], [], name="reward accuracy", pen=pg.mkPen("#31a354", width=1))
        self.val_margin = self.plot([], [], name="validation margin", pen=pg.mkPen("#e6550d", width=2), symbol="o",
                                    symbolSize=7, symbolBrush="#e6550d")
        self.val_accuracy = self.plot([], [], name="validation accuracy", pen=pg.mkPen("#756bb1", width=2),
                                      symbol="t", symbolSize=7, symbolBrush="#756bb1")
        self._redraw_timer = QTimer(self, singleShot=True, interval=100)
        self._redraw_timer.timeout.connect(self._redraw)
        self.clear_data()

    def clear_data(self):
        self.steps, self.margins, self.accuracies = [], [], []
        self.val_steps, self.val_margins, self.val_accuracies = [], [], []
        self._redraw()

    def add_step(self, step: int, margin: float, accuracy: float):
        self.steps.append(step)
        self.margins.append(margin)
        self.accuracies.append(accuracy)
        if not self._redraw_timer.isActive():
            self._redraw_timer.start()

    def add_val(self, step: int, margin: float, accuracy: float):
        self.val_steps.append(step)
        self.val_margins.append(margin)
        self.val_accuracies.append(accuracy)
        if not self._redraw_timer.isActive():
            self._redraw_timer.start()

    def _redraw(self):
        self.margin.setData(self.steps, self.margins)
        self.accuracy.setData(self.steps, self.accuracies)
        self.val_margin.setData(self.val_steps, self.val_margins)
        self.val_accuracy.setData(self.val_steps, self.val_accuracies)


class TrainingConsole(QWidget):
    FIELDS = ("step", "loss", "tokens/s", "elapsed", "ETA", "learning rate", "engine memory", "validation")

    def __init__(self, controller: TrainingController, parent=None):
        super().__init__(parent, objectName="training-console")
        self.controller = controller
        self.plot = LossPlot()
        self.rewards = RewardPlot()
        self.rewards.hide()
        self.rank_map = RankMap()
        self.rank_map.hide()      # plain LoRA runs have no rank map; the first event that carries one shows it
        self.values = {}
        grid = QGridLayout()
        for i, name in enumerate(self.FIELDS):
            label = QLabel("—", objectName=f"console-{name.replace(' ', '-').replace('/', '-per-')}")
            self.values[name] = label
            grid.addWidget(QLabel(name[0].upper() + name[1:] + ":"), i // 4, 2 * (i % 4))
            grid.addWidget(label, i // 4, 2 * (i % 4) + 1)
        self.progress = QProgressBar(objectName="console-progress")
        self.pause = QPushButton("Pause", objectName="console-pause")
        self.resume = QPushButton("Resume", objectName="console-resume")
        self.stop = QPushButton("Stop", objectName="console-stop")
        self.open_run = QPushButton("Open run…", objectName="console-open-run",
                                    toolTip="Plot a run's JSON-lines log (an exported job's output/log.jsonl, or "
                                            "`lora-lab train --json` output) beside this one")
        self.result = QLabel("No run yet. Plan one with the Plan button.", objectName="console-result", wordWrap=True)
        self.log = QPlainTextEdit(readOnly=True, objectName="console-log")
        self.checkpoints = QListWidget(objectName="console-checkpoints")
        controls = QHBoxLayout()
        controls.addWidget(self.progress, 1)
        for b in (self.pause, self.resume, self.stop, self.open_run):
            controls.addWidget(b)
        bottom = QSplitter(Qt.Horizontal)
        bottom.addWidget(self.log)
        side = QWidget()
        side_layout = QVBoxLayout(side)
        side_layout.setContentsMargins(0, 0, 0, 0)
        side_layout.addWidget(QLabel("Checkpoints"))
        side_layout.addWidget(self.checkpoints)
        bottom.addWidget(side)
        split = QSplitter(Qt.Vertical)
        plots = QSplitter(Qt.Horizontal)
        plots.addWidget(self.plot)
        plots.addWidget(self.rewards)
        plots.addWidget(self.rank_map)
        split.addWidget(plots)
        split.addWidget(bottom)
        layout = QVBoxLayout(self)
        layout.addLayout(grid)
        layout.addLayout(controls)
        layout.addWidget(self.result)
        layout.addWidget(split, 1)

        self.pause.clicked.connect(self._pause)
        self.resume.clicked.connect(self._resume)
        self.stop.clicked.connect(controller.stop)
        self.open_run.clicked.connect(lambda: self.load_run(QFileDialog.getOpenFileName(
            self, "Open a run's log", "", "Run logs (*.jsonl *.json *.log);;All files (*)")[0]))
        self._last_step = None
        self._fields_timer = QTimer(self, singleShot=True, interval=100)
        self._fields_timer.timeout.connect(self._show_step)
        controller.started.connect(self._on_started)
        controller.step.connect(self._on_step)
        controller.evaluated.connect(self._on_eval)
        controller.checkpointed.connect(lambda e: self.checkpoints.addItem(f"step {e.step}: {e.path}"))
        controller.log.connect(self.log.appendPlainText)
        controller.phase.connect(self._on_phase)
        controller.finished.connect(self._on_finished)
        controller.failed.connect(self._on_failed)
        controller.running_changed.connect(self._on_running)
        self._on_running(controller.running)

    def load_run(self, path: str) -> None:
        if not path:
            return
        try:
            run = read_run_log(path)
        except (OSError, ValueError) as exc:
            self.result.setText(f"Cannot open that run: {exc}")
            return
        name = Path(path).parent.name if Path(path).name == "log.jsonl" else Path(path).stem
        self.plot.add_run(name, run)
        self.log.appendPlainText(f"opened {path}: {len(run.steps)} steps" +
                                 (f" ({run.backend})" if run.backend else ""))

    def _pause(self):
        self.controller.pause()
        self._on_running(True)

    def _resume(self):
        self.controller.resume()
        self._on_running(True)

    def _on_running(self, running: bool):
        paused = self.controller.paused
        self.pause.setEnabled(running and not paused)
        self.resume.setEnabled(running and paused)
        self.stop.setEnabled(running)

    def _on_started(self, request):
        self._last_step = None
        self.plot.clear_data()
        self.rewards.clear_data()
        self.rewards.hide()
        adaptive = request.config.adaptive_rank
        self.rank_map.reset(request.config.lora.targets, adaptive.init_r if adaptive else request.config.lora.rank)
        self.rank_map.hide()
        self.checkpoints.clear()
        self.progress.setValue(0)
        for label in self.values.values():
            label.setText("—")
        self.values["step"].setText("starting…")
        self.result.setText(f"Training → {request.out_dir}")

    def _on_phase(self, text: str):
        # Before the first step (corpus, memory plan, backend measurement) the fields have nothing to show yet.
        self.values["step"].setText(f"starting: {text}…")

    def _on_step(self, e):
        self.plot.add_step(e.step, e.loss)
        if e.reward_margin is not None and not e.skipped:       # every step's point, as the loss plot's
            self.rewards.show()
            self.rewards.add_step(e.step, e.reward_margin, e.reward_accuracy)
        if e.rank_map is not None:      # AdaLoRA: the ranks kept after this step's budget allocation
            self.rank_map.show()
            self.rank_map.set_ranks(e.rank_map)
        # A small model runs dozens of steps a second; the fields follow at most every 100 ms, as the plot does.
        self._last_step = e
        if not self._fields_timer.isActive():
            self._fields_timer.start()

    def _show_step(self):
        e = self._last_step
        if e is None:
            return
        self.progress.setMaximum(e.total)
        self.progress.setValue(e.step)
        v = self.values
        v["step"].setText(f"{e.step} / {e.total} (epoch {e.epoch + 1})")
        v["loss"].setText(f"{e.loss:.4f}" + (" (skipped: not finite)" if e.skipped else ""))
        if e.reward_margin is not None and not e.skipped:
            v["loss"].setText(f"{e.loss:.4f}, reward margin {e.reward_margin:+.3f}, accuracy {e.reward_accuracy:.2f}")
        v["tokens/s"].setText(f"{e.tokens_per_s:,.0f}")
        v["elapsed"].setText(duration(e.elapsed_s))
        v["ETA"].setText(duration(e.eta_s))
        v["learning rate"].setText(f"{e.lr:.3g}")
        v["engine memory"].setText(f"{e.memory_bytes / 2**20:,.1f} MiB")

    def _on_eval(self, e):
        self.plot.add_val(e.step, e.loss)
        if e.reward_margin is None:
            self.values["validation"].setText(f"loss {e.loss:.4f}, perplexity {e.perplexity:.3f}")
            return
        self.rewards.show()
        self.rewards.add_val(e.step, e.reward_margin, e.reward_accuracy)
        self.values["validation"].setText(f"loss {e.loss:.4f}, reward margin {e.reward_margin:+.3f}, "
                                          f"accuracy {e.reward_accuracy:.3f}")

    def _on_finished(self, summary, perplexities):
        self._show_step()
        if self.rewards.val_steps:
            ppl = (f"Validation reward accuracy {self.rewards.val_accuracies[-1]:.3f}, margin "
                   f"{self.rewards.val_margins[-1]:+.3f} (chosen over rejected answers).")
        elif perplexities.before is not None and perplexities.after is not None:
            ppl = (f"Validation perplexity: {perplexities.before:.3f} before → {perplexities.after:.3f} after "
                   f"({perplexities.tokens:,} tokens).")
        else:
            ppl = "No validation data, so no perplexity (set a validation split in the corpus or plan)."
        advice = "".join(f"\n⚠ {line}" for line in self.controller.advice)
        self.result.setText(f"{'Stopped' if summary.stopped else 'Finished'}: {summary.steps}/{summary.total_steps}"
                            f" steps in {duration(summary.elapsed_s)}. {ppl} Chat now uses the new adapter "
                            f"({summary.adapter_dir.name}).{advice}")

    def _on_failed(self, message, _detail):
        self.result.setText(f"Training failed: {message}")
