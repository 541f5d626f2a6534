"""Training controls (pause, resume, stop) through the console, and the hardware inspector's Benchmark button."""
import time

import pytest
from PySide6.QtCore import Qt

from app.chat_controller import ChatController
from app.training_controller import RunRequest, TrainingController
from app.widgets.training_console import TrainingConsole
from engine.lora.config import LoraConfig
from engine.train.config import TrainConfig
from tests.gui_helpers import isolated_settings  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.gui


def test_pause_resume_stop_from_the_console(qtbot, tiny_llama_dir, tmp_path):
    data = tmp_path / "train.txt"
    data.write_text("LoRA adds a low rank update to frozen weights.\n" * 60, encoding="utf-8")
    chat = ChatController()
    controller = TrainingController(chat.handover)
    console = TrainingConsole(controller)
    qtbot.addWidget(console)
    steps = []
    controller.step.connect(lambda e: steps.append(e.step))
    config = TrainConfig(lora=LoraConfig(rank=4, alpha=8.0), batch_size=2, seq_len=32, max_steps=100000, lr=1e-3)
    controller.start(RunRequest(str(tiny_llama_dir), (str(data),), 0.0, config, tmp_path / "adapter", "cpu"))
    qtbot.waitUntil(lambda: len(steps) >= 3, timeout=60000)
    assert console.pause.isEnabled() and not console.resume.isEnabled()
    paused_log = []
    controller.log.connect(lambda line: line.startswith("paused after step") and paused_log.append(line))
    with qtbot.waitSignal(controller.paused_changed, timeout=30000) as paused:
        qtbot.mouseClick(console.pause, Qt.LeftButton)
        assert console.resume.isEnabled() and not console.pause.isEnabled()
    # The pause is announced when it took effect (the steps already started have finished), with its step.
    assert paused.args == [True]
    qtbot.wait(200)             # queued step events of those steps arrive before the pause event, not after
    paused_at = len(steps)
    assert paused_log == [f"paused after step {steps[-1]}"]
    qtbot.wait(1000)
    assert len(steps) == paused_at
    qtbot.mouseClick(console.resume, Qt.LeftButton)
    qtbot.waitUntil(lambda: len(steps) >= paused_at + 3, timeout=30000)
    with qtbot.waitSignal(controller.finished, timeout=60000) as finished:
        qtbot.mouseClick(console.stop, Qt.LeftButton)
    summary = finished.args[0]
    assert summary.stopped and summary.steps < 100000 and summary.steps == steps[-1]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert "Stopped" in console.result.text() and console.plot.steps == steps
    qtbot.waitUntil(lambda: not controller.running, timeout=10000)
    assert not console.stop.isEnabled()


def test_training_failure_reaches_the_console(qtbot, tiny_llama_dir, tmp_path):
    chat = ChatController()
    controller = TrainingController(chat.handover)
    console = TrainingConsole(controller)
    qtbot.addWidget(console)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n", encoding="utf-8")
    config = TrainConfig(lora=LoraConfig(rank=4, alpha=8.0), batch_size=2, seq_len=32, max_steps=2)
    with qtbot.waitSignal(controller.failed, timeout=60000) as failed:
        controller.start(RunRequest(str(tiny_llama_dir), (str(empty),), 0.0, config, tmp_path / "a", "cpu"))
    assert "no usable training data" in failed.args[0]
    assert "Training failed: " in console.result.text()


def test_benchmark_button_measures_adapters_and_cpu(qtbot, tiny_llama_dir):
    from engine.backends.hardware import detect
    from app.widgets.hardware_dialog import HardwareDialog

    hardware = detect()
    dialog = HardwareDialog(hardware, tiny_llama_dir)
    qtbot.addWidget(dialog)
    assert dialog.adapters.topLevelItemCount() == max(1, len(hardware.adapters))
    with qtbot.waitSignal(dialog.benchmarked, timeout=120000) as done:
        started = time.perf_counter()
        qtbot.mouseClick(dialog.benchmark, Qt.LeftButton)
    results = done.args[0]
    kinds = [b.kind for b in results]
    expected = [f"wgpu:{a.name}" for a in hardware.adapters if a.backend != "OpenGL"] + ["cpu"]
    assert kinds == expected and results[-1].gflops > 0, (results, time.perf_counter() - started)
    assert dialog.results.rowCount() == len(results)
    assert f"{results[-1].gflops:.2f}" == dialog.results.item(len(results) - 1, 1).text()
    # Each figure says what it measured: the loaded model on the CPU, a built-in tiny model on an adapter.
    assert results[-1].detail.startswith("training the loaded model (llama")
    assert "batch 1 x 64 tokens" in results[-1].detail and "GFLOP/s of those whole training steps" in results[-1].detail
    for b in results[:-1]:
        if not b.detail.startswith("failed"):
            assert "built-in tiny test model (not the loaded one: llama, hidden" in b.detail, b.detail
            assert b.detail.startswith("GFLOP/s of the engine's GEMM, 256×256×256 float32")
            assert " x 64 tokens: " in b.detail
    assert dialog.results.horizontalHeaderItem(2).text() == "What was measured (model, shape)"
    if not any(not a.software and a.backend != "OpenGL" for a in hardware.adapters):
        assert "training will use CPU" in dialog.explanation.text()


def test_console_says_what_happens_before_the_first_step_and_what_to_change_after(qtbot, tiny_llama_dir, tmp_path):
    """Every field showed '—' for the minute the backends were measured; an under-trained run ended without a
    word about what to change."""
    data = tmp_path / "train.txt"
    data.write_text("LoRA adds a low rank update to frozen weights.\n" * 20, encoding="utf-8")
    chat = ChatController()
    controller = TrainingController(chat.handover)
    console = TrainingConsole(controller)
    qtbot.addWidget(console)
    shown = []
    controller.phase.connect(lambda _text: shown.append(console.values["step"].text()))
    # A learning rate far too small for 12 steps: the loss stays near log(vocab).
    config = TrainConfig(lora=LoraConfig(rank=4, alpha=8.0), batch_size=2, seq_len=32, max_steps=12, lr=1e-7)
    with qtbot.waitSignal(controller.finished, timeout=120000):
        controller.start(RunRequest(str(tiny_llama_dir), (str(data),), 0.0, config, tmp_path / "a", "auto"))
    assert any(s.startswith("starting: measuring the training backends") for s in shown), shown
    assert any(s.startswith("starting: reading the corpus") for s in shown), shown
    assert controller.advice and controller.advice[0].startswith("under-trained")
    text = console.result.text()
    assert "⚠ under-trained" in text and "steps 12 -> 24" in text
    assert "under-trained" in console.log.toPlainText()
