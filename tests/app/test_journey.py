"""The whole journey through the widgets on a tiny model: load, corpus, wizard defaults, train to the end (the
event loop never stalls), evaluate, save, chat with the adapter, Compare. CPU backend (onnxruntime).

One test, one helper per stage called in order: each stage starts from where the previous one left the window."""
import time

import pytest
from PySide6.QtCore import QMimeData, QPointF, QSettings, Qt, QTimer, QUrl
from PySide6.QtGui import QDropEvent
from PySide6.QtWidgets import QDialogButtonBox, QWizard

from app.main_window import MainWindow
from tests.gui_helpers import isolated_settings  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.gui


TEXT = ("The quick brown fox jumps over the lazy dog. What is the capital of France? The capital of France is "
        "Paris.\nLoRA adapters add a low rank update to the frozen weights of a language model.\n")



def drop(widget, paths):
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(p)) for p in paths])
    event = QDropEvent(QPointF(10, 10), Qt.CopyAction, mime, Qt.LeftButton, Qt.NoModifier)
    widget.dropEvent(event)


class StallMeter:
    """Largest gap between ticks of a 10 ms timer: how long the event loop was ever blocked."""

    def __init__(self):
        self.timer = QTimer(interval=10)
        self.timer.timeout.connect(self._tick)
        self.last, self.worst = None, 0.0

    def _tick(self):
        now = time.perf_counter()
        if self.last is not None:
            self.worst = max(self.worst, now - self.last)
        self.last = now

    def start(self):
        self.last = time.perf_counter()
        self.timer.start()

    def stop(self):
        self.timer.stop()


def test_whole_journey(qtbot, tiny_llama_dir, tmp_path, monkeypatch):
    corpus_file = tmp_path / "train.txt"
    corpus_file.write_text(TEXT * 12, encoding="utf-8")
    out = tmp_path / "adapter"
    window = open_window(qtbot, tiny_llama_dir)
    read_corpus(qtbot, window, corpus_file)
    wizard = plan_run(qtbot, window, out)
    run_elsewhere(qtbot, window, wizard, tmp_path / "jobs", monkeypatch)
    name = train(qtbot, window, wizard, out)
    evaluate(qtbot, window)
    save_adapter(qtbot, window, out, tmp_path / "saved")
    chat_with_adapter(qtbot, window, name)
    compare_with_base(qtbot, window, name)


def open_window(qtbot, model_dir) -> MainWindow:
    """The window with the model loaded for chat and the hardware detected: Corpus and Train are open to use."""
    window = MainWindow(str(model_dir))
    qtbot.addWidget(window)
    window.show()
    qtbot.waitUntil(lambda: window.chat.engine.loaded and window.hardware is not None, timeout=30000)
    assert window.buttons["Corpus"].isEnabled() and window.buttons["Train"].isEnabled()
    return window


def read_corpus(qtbot, window, corpus_file) -> None:
    """Corpus: drop the file on the dialog, read it, use it."""
    qtbot.mouseClick(window.buttons["Corpus"], Qt.LeftButton)
    dialog = window.dialogs["corpus"]
    drop(dialog, [corpus_file])
    # Read as soon as it is added: no 'not read yet' waiting for a button.
    assert dialog.table.rowCount() == 1 and dialog.table.item(0, 1).text() == "reading…"
    qtbot.waitUntil(lambda: window.corpus_controller.corpus is not None and not window.corpus_controller.running,
                    timeout=30000)
    assert dialog.table.item(0, 1).text().startswith("text")
    dialog.seq_len.setValue(32)
    dialog.val_split.setValue(0.2)
    qtbot.mouseClick(dialog.read, Qt.LeftButton)
    qtbot.waitUntil(lambda: window.corpus_controller.corpus.config.seq_len == 32
                    and not window.corpus_controller.running, timeout=30000)
    corpus = window.corpus_controller.corpus
    assert dialog.table.item(0, 1).text().startswith("text") and int(dialog.table.item(0, 2).text()) == 1
    assert int(dialog.table.item(0, 4).text().replace(",", "")) == corpus.stats.files[0].trainable_tokens > 0
    assert "background:#d9f2d9" in dialog.preview.toHtml() or "#d9f2d9" in dialog.preview.toHtml()
    qtbot.mouseClick(dialog.buttons.button(QDialogButtonBox.Ok), Qt.LeftButton)
    assert window.corpus is corpus and window.buttons["Train"].isEnabled()


def plan_run(qtbot, window, out):
    """Plan: the wizard's defaults, CPU backend, adapter into `out`; left on the review page."""
    qtbot.mouseClick(window.buttons["Train"], Qt.LeftButton)
    wizard = window.dialogs["plan"]
    assert wizard.val_split.value() > 0 and wizard.rank.value() == 16
    wizard.backend.setCurrentIndex(wizard.backend.findData("cpu"))
    # The defaults give this tiny corpus ~100 steps (tests/train/test_recommend.py checks them); the journey needs
    # a few: 100 tiny-model steps in 3 s keep two shared cores so busy that the stall meter trips on scheduling.
    wizard.epochs.setValue(3)
    while wizard.currentId() != wizard.pageIds()[-1]:
        wizard.next()
    assert "steps" in wizard.review_label.text() and "GiB" in wizard.review_label.text()
    # The CPU trains this run: its memory, not the WGSL engine's plan, is what the review describes.
    assert "CPU backend" in wizard.review_label.text() and "WGSL" not in wizard.review_label.text()
    assert "little data" in wizard.warnings.text()
    wizard.out_dir.setText(str(out))
    return wizard


def run_elsewhere(qtbot, window, wizard, parent, monkeypatch) -> None:
    """"Run elsewhere…" on the review page writes the planned run as an accelerate job into the chosen folder."""
    from PySide6.QtWidgets import QFileDialog, QPushButton

    parent.mkdir()
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *_a, **_k: str(parent))
    qtbot.mouseClick(wizard.findChild(QPushButton, "plan-run-elsewhere"), Qt.LeftButton)
    job = parent / f"{wizard.out_dir.text().rsplit('/', 1)[-1]}-job"
    qtbot.waitUntil(lambda: (job / "job.json").is_file() and "job written to" in window.log.toPlainText(),
                    timeout=60000)
    assert (job / "train.py").is_file() and (job / "README.md").is_file()


def train(qtbot, window, wizard, out) -> str:
    """Start training from the wizard, run to the end without stalling the event loop; the new adapter's name."""
    reviewed = wizard.review_label.text()
    meter = StallMeter()
    meter.start()
    qtbot.mouseClick(wizard.button(QWizard.FinishButton), Qt.LeftButton)
    assert window.training.running
    qtbot.waitUntil(lambda: not window.training.running, timeout=60000)
    assert window.training.summary is not None, window.log.toPlainText()
    # The handover brings chat back with the new adapter after training; wait for it to be active.
    qtbot.waitUntil(lambda: window.chat.active_adapter is not None, timeout=30000)
    meter.stop()
    summary = window.training.summary
    assert summary.steps == summary.total_steps > 0 and not summary.stopped
    assert f"<b>{summary.total_steps:,} steps</b>" in reviewed      # the review counted the run's own steps
    plot = window.console.plot
    assert plot.steps == list(range(1, summary.total_steps + 1)) and len(plot.val_steps) >= 1
    assert "before" in window.console.result.text() and "after" in window.console.result.text()
    assert (out / "adapter_model.safetensors").is_file()
    assert window.console.checkpoints.count() >= 1
    assert meter.worst < 0.100, f"the event loop stalled for {meter.worst * 1000:.0f} ms during training"
    name = window.chat.active_adapter
    assert window.chat_panel.adapter.currentText() == name
    return name


def evaluate(qtbot, window) -> None:
    """Evaluate: perplexity of the base and the new adapter on the corpus, computed in a child process."""
    QSettings().setValue("train/backend", "cpu")
    with qtbot.waitSignal(window.evaluated, timeout=60000) as evaluated:
        qtbot.mouseClick(window.buttons["Evaluate"], Qt.LeftButton)
    base, tuned = evaluated.args[0]["base"], evaluated.args[0]["adapter"]
    assert base.tokens == tuned.tokens > 0 and tuned.perplexity != base.perplexity
    assert f"{tuned.perplexity:.3f}" in window.log.toPlainText()


def save_adapter(qtbot, window, out, saved) -> None:
    """Save through the dialog: PEFT, GGUF + Modelfile and merged; saving again into the same folder fails."""
    qtbot.mouseClick(window.buttons["Save Adapter"], Qt.LeftButton)
    save = window.dialogs["save"]
    save.folder.setText(str(saved))
    save.gguf.setChecked(True)
    save.merged.setChecked(True)
    qtbot.mouseClick(save.buttons.button(QDialogButtonBox.Save), Qt.LeftButton)
    qtbot.waitUntil(lambda: bool(save.written), timeout=60000)
    assert (saved / out.name / "adapter_model.safetensors").is_file()
    assert any(p.suffix == ".gguf" for p in saved.rglob("*"))
    assert "GGUF" in save.summary.toPlainText() and "merged" in save.summary.toPlainText()
    assert (saved / f"{out.name}-merged" / "config.json").is_file()
    assert "saved GGUF: wrote" in window.log.toPlainText()
    qtbot.mouseClick(save.buttons.button(QDialogButtonBox.Save), Qt.LeftButton)   # again: the folder exists
    qtbot.waitUntil(lambda: "save failed" in save.status.text(), timeout=30000)
    assert "already exists" in save.status.text() and "save failed: FileExistsError" in window.log.toPlainText()


def chat_with_adapter(qtbot, window, name) -> None:
    """Chat with the adapter active: one conversation, answered by the adapter."""
    panel = window.chat_panel
    window.tabs.setCurrentWidget(panel)
    panel.generation.max_new_tokens.setValue(6)
    panel.generation.temperature.setValue(0.0)
    panel.prompt.setPlainText("What is the capital of France?")
    qtbot.mouseClick(panel.send, Qt.LeftButton)
    qtbot.waitUntil(lambda: not window.chat.busy and bool(window.chat.last_answer()), timeout=30000)
    conv = window.chat.conversations
    assert len(conv) == 1 and conv[0].adapter == name and conv[0].messages[-1]["role"] == "assistant"


def compare_with_base(qtbot, window, name) -> None:
    """Compare: the same prompt answered by the base and the adapter, side by side."""
    panel = window.chat_panel
    qtbot.mouseClick(panel.compare, Qt.LeftButton)
    panel.prompt.setPlainText("Tell me about LoRA.")
    qtbot.mouseClick(panel.send, Qt.LeftButton)
    qtbot.waitUntil(lambda: not window.chat.busy and all(c.answer_so_far() for c in window.chat.conversations),
                    timeout=30000)
    conv = window.chat.conversations
    assert [c.adapter for c in conv] == [None, name]
    speakers = ["base model:", f"{name}:"]
    qtbot.waitUntil(lambda: all(v.isVisible() and "Tell me about LoRA." in v.toPlainText() and s in v.toPlainText()
                                and "…" not in v.toPlainText() for v, s in zip(panel.views, speakers)), timeout=3000)
