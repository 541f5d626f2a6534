"""The training console's "Open run…": a run's JSON-lines log (an exported job's, or `train --json`) plotted beside."""
import json

import pytest
from PySide6.QtCore import Qt

from app.chat_controller import ChatController
from app.training_controller import TrainingController
from app.widgets.training_console import TrainingConsole
from engine.train.job import read_run_log
from tests.gui_helpers import isolated_settings  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.gui

LOG = [{"event": "step", "step": 1, "loss": 6.4, "skipped": False}, {"event": "step", "step": 2, "loss": None,
                                                                      "skipped": True},
       {"event": "step", "step": 3, "loss": 6.1, "skipped": False}, {"event": "eval", "step": 3, "loss": 6.0},
       {"event": "summary", "backend": "accelerate: 2 process(es), MULTI_CPU, cpu"}]


def test_read_run_log_keeps_applied_steps_and_refuses_other_files(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in LOG) + "\n", encoding="utf-8")
    run = read_run_log(path)
    assert (run.steps, run.losses, run.eval_steps, run.eval_losses) == ((1, 3), (6.4, 6.1), (3,), (6.0,))
    assert run.backend.startswith("accelerate")
    (tmp_path / "notes.txt").write_text("hello\n", encoding="utf-8")
    with pytest.raises(ValueError, match="notes.txt line 1"):
        read_run_log(tmp_path / "notes.txt")


def test_open_run_plots_the_log_beside_the_live_run(qtbot, tmp_path, monkeypatch):
    job = tmp_path / "job-output"
    job.mkdir()
    (job / "log.jsonl").write_text("\n".join(json.dumps(e) for e in LOG) + "\n", encoding="utf-8")
    console = TrainingConsole(TrainingController(ChatController().handover))
    qtbot.addWidget(console)
    monkeypatch.setattr("app.widgets.training_console.QFileDialog.getOpenFileName",
                        lambda *a, **k: (str(job / "log.jsonl"), ""))
    qtbot.mouseClick(console.open_run, Qt.LeftButton)
    curve, evals = console.plot.other_runs
    assert list(curve.getData()[0]) == [1, 3] and list(evals.getData()[1]) == [6.0]
    assert "job-output" in curve.name() and "2 steps" in console.log.toPlainText()
    monkeypatch.setattr("app.widgets.training_console.QFileDialog.getOpenFileName",
                        lambda *a, **k: (str(tmp_path / "missing.jsonl"), ""))
    qtbot.mouseClick(console.open_run, Qt.LeftButton)
    assert console.result.text().startswith("Cannot open that run") and len(console.plot.other_runs) == 2
