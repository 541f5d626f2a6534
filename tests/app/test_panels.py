"""The panels one at a time: safe Markdown, chat controls, adapter drop, corpus dialog details, plan numbers,
settings that persist, errors that reach the window."""
import json
from pathlib import Path
import math

import pytest
from PySide6.QtCore import QSettings, Qt
from PySide6.QtGui import QGuiApplication

from app.chat_controller import ChatController
from app.corpus_controller import CorpusController, save_pasted
from app.plan import Benchmark, CorpusSummary, recommend, review, total_steps
from app.widgets.corpus_dialog import CorpusDialog, SkippedDialog
from app.widgets.markdown_view import MarkdownView
from tests.chat_helpers import make_adapter
from tests.gui_helpers import isolated_settings  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.gui


def test_markdown_from_the_model_is_never_html(qtbot, tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not an image")
    view = MarkdownView()
    qtbot.addWidget(view)
    view.show_markdown(f"**bold** <script>alert(1)</script> <b>raw</b>\n\n![x]({secret}) [link](http://example.com)")
    html = view.toHtml()
    text = view.toPlainText()
    assert "<script>" not in html and "&lt;script&gt;" in html and "<b>raw</b>" in text
    assert "font-weight:700" in html                       # Markdown itself is rendered
    assert view.loadResource(0, secret.as_uri()) is None   # images are never loaded
    assert not view.openLinks() and not view.openExternalLinks()


def _chat(qtbot, tiny_llama_dir):
    chat = ChatController()
    with qtbot.waitSignal(chat.model_ready, timeout=30000):
        chat.load_model(str(tiny_llama_dir))
    return chat


def test_chat_stop_regenerate_clear_copy(qtbot, tiny_llama_dir):
    from engine.chat.generation import GenerationSettings

    chat = _chat(qtbot, tiny_llama_dir)
    chat.settings = GenerationSettings(max_new_tokens=4000, temperature=1.0, seed=1)
    chat.send("Hello")
    qtbot.waitUntil(lambda: len(chat.last_answer()) > 0, timeout=20000)
    chat.stop()
    qtbot.waitUntil(lambda: not chat.busy and not chat.engine.generating, timeout=5000)
    stopped = chat.last_answer()
    assert 0 < len(stopped) and chat.conversations[0].stopped == {1}
    from app.widgets.chat_panel import conversation_markdown

    assert conversation_markdown(chat.conversations[0], busy=False).endswith("*(stopped)*")
    # Toggling Compare keeps the conversation of the model that stays (it used to wipe it).
    chat.set_compare(True)
    assert len(chat.conversations) == 2 and chat.conversations[0] is not chat.conversations[1]
    assert chat.conversations[1].messages[1]["content"] == stopped and chat.conversations[0].messages == []
    chat.set_compare(False)
    assert chat.conversations[0].messages[1]["content"] == stopped
    chat.settings = GenerationSettings(max_new_tokens=5, temperature=0.0)
    chat.regenerate()
    qtbot.waitUntil(lambda: not chat.busy, timeout=20000)
    messages = chat.conversations[0].messages
    assert [m["role"] for m in messages] == ["user", "assistant"] and messages[1]["content"] != stopped
    assert chat.conversations[0].stopped == set()       # the new answer ran to its end
    from app.widgets.chat_panel import ChatPanel

    panel = ChatPanel(chat)
    qtbot.addWidget(panel)
    qtbot.mouseClick(panel.copy, Qt.LeftButton)
    assert QGuiApplication.clipboard().text() == messages[1]["content"]
    qtbot.mouseClick(panel.clear, Qt.LeftButton)
    assert chat.conversations[0].messages == []


def test_compare_streams_both_answers_at_once_and_marks_a_stop(qtbot, tiny_llama_dir, tmp_path):
    """Compare ran the base, then the adapter (whose column waited for the base's 256 tokens); a stop marked
    nothing."""
    from engine.chat.generation import GenerationSettings

    chat = _chat(qtbot, tiny_llama_dir)
    with qtbot.waitSignal(chat.adapters_changed, timeout=30000):
        chat.load_adapter(make_adapter(tiny_llama_dir, tmp_path / "mine", seed=3))
    chat.set_compare(True)
    assert [c.adapter for c in chat.conversations] == [None, "mine"]
    chat.settings = GenerationSettings(max_new_tokens=12, temperature=0.0, repetition_penalty=1.0)
    lengths = []
    chat.conversations_changed.connect(lambda: lengths.append([len(c.answer_so_far()) for c in chat.conversations]))
    chat.send("Hello")
    qtbot.waitUntil(lambda: not chat.busy, timeout=30000)
    first_of_adapter = next(i for i, (_, n) in enumerate(lengths) if n > 0)
    assert lengths[-1][0] > lengths[first_of_adapter][0], lengths     # the base kept growing after that
    assert all(c.stopped == set() for c in chat.conversations)
    chat.settings = GenerationSettings(max_new_tokens=4000, temperature=1.0, seed=1)
    chat.send("Tell me more")
    qtbot.waitUntil(lambda: all(c.answer_so_far() for c in chat.conversations), timeout=30000)
    chat.stop()
    qtbot.waitUntil(lambda: not chat.busy and not chat.engine.generating, timeout=5000)
    assert all(c.stopped == {3} for c in chat.conversations)
    from app.widgets.chat_panel import conversation_markdown

    assert all(conversation_markdown(c, busy=False).endswith("*(stopped)*") for c in chat.conversations)


def test_dropping_an_adapter_loads_it_into_chat(qtbot, tiny_llama_dir, tmp_path):
    from app.main_window import MainWindow

    adapter = make_adapter(tiny_llama_dir, tmp_path / "my-adapter", seed=3)
    window = MainWindow(str(tiny_llama_dir))
    qtbot.addWidget(window)
    qtbot.waitUntil(lambda: window.chat.engine.loaded, timeout=30000)
    window.drop_path(adapter / "adapter_model.safetensors")
    qtbot.waitUntil(lambda: window.chat_panel.adapter.currentText() == "my-adapter", timeout=30000)
    assert window.chat.active_adapter == "my-adapter"
    assert window.buttons["Save Adapter"].isEnabled()
    window.drop_path(tmp_path)        # not an adapter: a readable message in the log
    assert "is not a PEFT adapter" in window.log.toPlainText()


def test_corpus_dialog_lists_skipped_lines_and_cancels(qtbot, tiny_llama_dir, tmp_path):
    good = json.dumps({"prompt": "Q: what is 2+2?", "completion": " 4"})
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join([good, "{broken", good, "[1, 2]", good]) + "\n", encoding="utf-8")
    controller = CorpusController()
    dialog = CorpusDialog(controller, tiny_llama_dir)
    qtbot.addWidget(dialog)
    pasted = save_pasted("one line of pasted text\nand another", tmp_path / "pasted")
    assert pasted.suffix == ".txt" and save_pasted(good + "\n" + good, tmp_path / "pasted").suffix == ".jsonl"
    controller.add([data, pasted])
    dialog.seq_len.setValue(64)
    with qtbot.waitSignal(controller.loaded, timeout=30000):
        qtbot.mouseClick(dialog.read, Qt.LeftButton)
    assert dialog.progress.value() == 100
    # The files just read are offered again next time (QSettings).
    again = CorpusDialog(CorpusController(), tiny_llama_dir)
    qtbot.addWidget(again)
    again._fill_recent()
    assert [a.text() for a in again.recent.menu().actions()] == [str(data), str(pasted)]
    stats = controller.corpus.stats.files[0]
    assert dialog.table.item(0, 5).text().startswith("2") and stats.skipped_count == 2
    assert "prompt_completion (3)" in dialog.table.item(0, 1).text() or "(3)" in dialog.table.item(0, 1).text()
    skipped = SkippedDialog(stats)
    qtbot.addWidget(skipped)
    table = skipped.findChild(object, "skipped-table")
    assert [table.item(r, 0).text() for r in range(table.rowCount())] == ["2", "4"]
    assert table.item(0, 1).text() == stats.skipped[0].reason
    # Cancelling: a 3 MiB file is read in 1 MiB chunks and cancellation is checked at each, so it always lands.
    qtbot.waitUntil(lambda: not controller.running, timeout=5000)   # `done` follows `loaded`
    before = controller.corpus
    big = tmp_path / "big.txt"
    big.write_text("a line of plain text to read\n" * 110_000, encoding="utf-8")
    controller.files = [big]
    errors = []
    controller.failed.connect(lambda m, d: errors.append(m))
    controller.load(tiny_llama_dir, 64, 0.0)
    assert controller.running and dialog.cancel.isEnabled()
    qtbot.mouseClick(dialog.cancel, Qt.LeftButton)
    assert controller._cancel.is_set()
    qtbot.waitUntil(lambda: not controller.running, timeout=30000)
    assert errors == ["corpus loading cancelled"] and controller.corpus is before
    assert "cancelled" in dialog.totals.text()


def test_corpus_dialog_reads_on_add_shows_refusals_and_removes_files(qtbot, tiny_llama_dir, tmp_path):
    """Files waited at 'not read yet'; a refused file said 0 skipped (its reason only in a tooltip); an empty file
    was accepted silently; nothing could be removed; a long path pushed the columns off-screen."""
    deep = tmp_path / ("a-very-long-folder-name-that-goes-on-" * 6)
    deep.mkdir()
    good = deep / "good.txt"
    good.write_text("Some text to train on.\n" * 5, encoding="utf-8")
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json at all", encoding="utf-8")
    controller = CorpusController()
    dialog = CorpusDialog(controller, tiny_llama_dir)
    qtbot.addWidget(dialog)
    dialog.show()
    width = dialog.width()
    with qtbot.waitSignal(controller.loaded, timeout=30000):
        controller.add([good, empty, broken])
    qtbot.waitUntil(lambda: not controller.running, timeout=10000)
    assert dialog.table.item(0, 1).text().startswith("text")
    assert dialog.table.item(1, 1).text() == "refused" and "empty" in dialog.table.item(1, 5).text()
    assert dialog.table.item(2, 1).text() == "refused" and dialog.table.item(2, 5).text().startswith("whole file:")
    assert dialog.width() == width and dialog.table.columnWidth(0) <= max(200, width // 2)
    dialog.table.selectRow(1)
    with qtbot.waitSignal(controller.loaded, timeout=30000):      # removing reads the rest again
        qtbot.keyClick(dialog.table, Qt.Key_Delete)
    assert controller.files == [good, broken] and dialog.table.rowCount() == 2
    assert [Path(f.path) for f in controller.corpus.stats.files] == [good, broken]
    # The row's context menu removes it too.
    qtbot.waitUntil(lambda: not controller.running, timeout=10000)
    menu = dialog.row_menu(1)
    assert [a.text() for a in menu.actions()] == ["Remove from the corpus"]
    with qtbot.waitSignal(controller.loaded, timeout=30000):
        menu.actions()[0].trigger()
    assert controller.files == [good] and dialog.table.rowCount() == 1


def test_plan_numbers_follow_the_corpus_and_hardware(tiny_llama_dir):
    from engine.backends.hardware import detect
    from engine.backends.wgpu.microbench import step_flops
    from engine.model.spec import load_model_spec
    from engine.backends.wgpu.memory import memory_plan

    spec = load_model_spec(tiny_llama_dir)
    summary = CorpusSummary(("a.jsonl",), sequences=40, trainable_tokens=3000, longest=50, seq_len=512)
    config, val_split = recommend(summary, spec, has_hardware_gpu=False)
    # 40 examples: all trained on, 10 batches an epoch, 10 epochs for the ~100 steps a small corpus needs.
    assert config.seq_len == 64 and val_split == 0.0 and config.batch_size == 4 and config.epochs == 10
    steps = total_steps(config, summary.sequences, val_split)
    assert steps == 10 * math.ceil(40 / 4)
    hardware = detect()
    r = review(config, spec, summary, val_split, hardware, [], backend="wgpu")
    limit = next((a.limits.get("max-storage-buffer-binding-size") for a in hardware.adapters
                  if not a.software and a.backend != "OpenGL"), None) or (1 << 31) - 4
    assert r.runs_on == "gpu" and r.engine_bytes == memory_plan(spec, config.lora, config.optim, 4, 64, limit).total
    assert r.eta_s is None and "not measured on this machine yet" in r.eta_basis
    assert any("little data" in w for w in r.warnings)
    bench = [Benchmark("cpu", "CPU", 2.0), Benchmark("wgpu:lavapipe", "llvmpipe", 50.0, software=True)]
    r = review(config, spec, summary, val_split, hardware, bench, backend="cpu")
    assert r.eta_s == pytest.approx(steps * step_flops(spec, config.lora, 4 * 64, 64) / 2e9)
    assert "CPU: 2.0 GFLOP/s" in r.eta_basis      # the software adapter is not what training would use


def test_review_shows_the_backend_that_will_run_and_an_eta_from_an_earlier_run(tiny_llama_dir):
    """The review showed the WGSL plan (0.91 GiB) for a CPU run, and 'no benchmark yet' until the user found the
    hardware inspector, although the run before had measured the backends."""
    from types import SimpleNamespace

    from engine.model.spec import load_model_spec

    spec = load_model_spec(tiny_llama_dir)
    summary = CorpusSummary(("a.jsonl",), sequences=30, trainable_tokens=900, longest=20, seq_len=64)
    config, val_split = recommend(summary, spec, has_hardware_gpu=False)
    no_gpu = SimpleNamespace(adapters=[], ram_available_bytes=8 << 30)
    r = review(config, spec, summary, val_split, no_gpu, [])
    assert r.runs_on == "cpu" and r.engine_bytes is None and r.plan is None
    speeds = {"tokens_per_s": {"cpu": 128.0, "wgpu:GPU": 4096.0}, "batch": config.batch_size,
              "seq_len": config.seq_len}
    r = review(config, spec, summary, val_split, no_gpu, [], speeds=speeds)
    tokens = config.batch_size * config.seq_len
    assert r.eta_s == pytest.approx(r.steps * tokens / 128.0) and "measured by an earlier run" in r.eta_basis
    gpu = SimpleNamespace(adapters=[SimpleNamespace(name="GPU", software=False, backend="Vulkan", memory_bytes=None,
                                                    limits={})], ram_available_bytes=8 << 30)
    r = review(config, spec, summary, val_split, gpu, [], speeds={**speeds, "seq_len": 2 * config.seq_len})
    assert r.runs_on == "gpu" and r.eta_s == pytest.approx(r.steps * tokens / 4096.0)
    assert "scaled to this shape" in r.eta_basis


def test_generation_settings_and_recent_models_persist(qtbot, tiny_llama_dir):
    from app.main_window import MainWindow

    window = MainWindow(str(tiny_llama_dir))
    qtbot.addWidget(window)
    qtbot.waitUntil(lambda: window.model_dir is not None, timeout=30000)
    window.chat_panel.generation.temperature.setValue(0.35)
    window.chat_panel.generation.seed.setValue(42)
    window.close()
    again = MainWindow()
    qtbot.addWidget(again)
    assert again.chat.settings.temperature == pytest.approx(0.35) and again.chat.settings.seed == 42
    assert again.chat_panel.generation.temperature.value() == pytest.approx(0.35)
    assert again.picker.combo.itemData(0) == str(tiny_llama_dir)
    assert QSettings().value("model/last") == str(tiny_llama_dir)
