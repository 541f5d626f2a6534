"""What survives a model reload and a restart: the adapters that fit and the corpus (read again with the new
model's tokenizer), the runs trained before (in the one data folder), the last chat; unreadable or missing files
are notes, never a crash."""
import json
from pathlib import Path

import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QDialogButtonBox

from app.main_window import MainWindow
from app.training_controller import RunRequest
from engine.lora.config import LoraConfig
from engine.model.references import data_dir
from engine.train.config import TrainConfig
from tests.chat_helpers import make_adapter
from tests.gui_helpers import isolated_settings  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.gui


def _window(qtbot, model_dir) -> MainWindow:
    window = MainWindow(str(model_dir))
    qtbot.addWidget(window)
    qtbot.waitUntil(lambda: window.chat.engine.loaded and window.model_dir is not None, timeout=30000)
    return window


def _load(qtbot, window, model_dir) -> None:
    with qtbot.waitSignal(window.chat.model_ready, timeout=30000):
        window.load_model(str(model_dir))
    qtbot.waitUntil(lambda: not window.corpus_controller.running, timeout=30000)


def test_reloading_keeps_the_adapters_that_fit_and_the_corpus(qtbot, tiny_model_dirs, tmp_path):
    """Reloading the model dropped the corpus and the adapters from 'Answer with'."""
    llama, qwen3 = tiny_model_dirs["llama"], tiny_model_dirs["qwen3"]
    window = _window(qtbot, llama)
    window.drop_path(make_adapter(llama, tmp_path / "mine", seed=3))
    qtbot.waitUntil(lambda: window.chat.active_adapter == "mine", timeout=30000)
    data = tmp_path / "train.txt"
    data.write_text("LoRA adds a low rank update to frozen weights.\n" * 20, encoding="utf-8")
    window.open_corpus()
    dialog = window.dialogs["corpus"]
    with qtbot.waitSignal(window.corpus_controller.loaded, timeout=30000):
        window.corpus_controller.add([data])
    qtbot.waitUntil(lambda: not window.corpus_controller.running, timeout=10000)
    qtbot.mouseClick(dialog.buttons.button(QDialogButtonBox.Ok), Qt.LeftButton)
    corpus = window.corpus
    assert corpus is not None

    _load(qtbot, window, llama)                 # the same model again: everything stays
    assert window.chat.adapter_names == ["mine"] and window.chat.active_adapter == "mine"
    assert window.chat_panel.adapter.currentText() == "mine" and window.corpus is corpus

    _load(qtbot, window, qwen3)                 # another base: the adapter cannot come, the corpus is read again
    assert window.chat.adapter_names == [] and window.chat_panel.adapter.currentText() == "Base"
    log = window.log.toPlainText()
    assert "adapter mine is left out of 'Answer with'" in log and "trained for another base model" in log
    qtbot.waitUntil(lambda: window.corpus is not None, timeout=30000)
    assert window.corpus is not corpus and window.buttons["Train"].isEnabled()
    assert [Path(f.path) for f in window.corpus.stats.files] == [data]


def test_a_restart_reopens_the_runs_and_the_last_chat(qtbot, tiny_llama_dir, tmp_path):
    """After a restart the adapters trained before, the corpus and the chat were gone."""
    from engine.chat.generation import GenerationSettings

    window = _window(qtbot, tiny_llama_dir)
    data = tmp_path / "train.txt"
    data.write_text("LoRA adds a low rank update to frozen weights.\n" * 20, encoding="utf-8")
    config = TrainConfig(lora=LoraConfig(rank=4, alpha=8.0), batch_size=2, seq_len=32, max_steps=2)
    out = tmp_path / "run-adapter"
    with qtbot.waitSignal(window.training.finished, timeout=120000):
        window.start_training(RunRequest(str(tiny_llama_dir), (str(data),), 0.0, config, out, "cpu"))
    qtbot.waitUntil(lambda: window.chat.active_adapter == "run-adapter", timeout=30000)
    runs = json.loads((data_dir() / "runs.json").read_text(encoding="utf-8"))["runs"]
    assert [(r["adapter_dir"], r["model_dir"], r["corpus"]) for r in runs] == \
        [(str(out.resolve()), str(tiny_llama_dir.resolve()), [str(data)])]
    assert runs[0]["plan"]["lora"]["rank"] == 4 and runs[0]["metrics"]["steps"] == 2
    assert window.runs_list.tree.topLevelItemCount() == 1
    window.chat.settings = GenerationSettings(max_new_tokens=3, temperature=0.0)
    window.chat.send("Hello there")
    qtbot.waitUntil(lambda: not window.chat.busy, timeout=30000)
    answer = window.chat.last_answer()
    window.close()

    again = _window(qtbot, tiny_llama_dir)
    qtbot.waitUntil(lambda: again.chat.adapter_names == ["run-adapter"], timeout=30000)
    item = again.runs_list.tree.topLevelItem(0)
    assert item.text(0) == "run-adapter" and item.text(2) == "2/2" and str(data) in item.toolTip(0)
    qtbot.waitUntil(lambda: again.chat.conversations[0].messages != [], timeout=30000)
    conv = again.chat.conversations[0]
    assert conv.adapter == "run-adapter" and again.chat.active_adapter == "run-adapter"
    assert conv.messages == [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": answer}]
    assert again.chat_panel.adapter.currentText() == "run-adapter"
    again.close()
    (data_dir() / "last-chat.json").unlink()
    third = _window(qtbot, tiny_llama_dir)      # without a last chat: the run's adapter is offered, not chosen
    qtbot.waitUntil(lambda: third.chat.adapter_names == ["run-adapter"], timeout=30000)
    assert third.chat.active_adapter is None and third.chat.conversations[0].messages == []


def test_unreadable_or_missing_session_files_are_notes(qtbot, tiny_llama_dir, tmp_path):
    home = data_dir()
    home.mkdir(parents=True)
    (home / "runs.json").write_text('{"runs": [{"adapter_dir": "' + str(tmp_path / "gone") + '", "model": "m", '
                                    '"model_dir": "/m", "corpus": [], "plan": {}, "metrics": {}, '
                                    '"finished_at": "2026-12-01T00:00:00Z"}, 7]}', encoding="utf-8")
    (home / "last-chat.json").write_bytes(b"\xff\xfe not text")
    window = _window(qtbot, tiny_llama_dir)
    log = window.log.toPlainText()
    assert "run 2 of the runs list" in log and "expected a JSON object" in log
    assert f"{tmp_path / 'gone'} is gone" in log
    assert "the last chat" in log and "starts empty" in log
    assert window.runs_list.tree.topLevelItemCount() == 0 and window.chat.conversations[0].messages == []
    window.close()
    # A chat file of the right shape whose column is not: a note, and an empty chat.
    (home / "last-chat.json").write_text(json.dumps({"model": str(tiny_llama_dir), "compare": False, "active": None,
                                                     "columns": [{"adapter": None, "messages": "oops"}]}))
    again = _window(qtbot, tiny_llama_dir)
    qtbot.waitUntil(lambda: "the last chat could not be restored" in again.log.toPlainText(), timeout=30000)
    assert again.chat.conversations[0].messages == []


def test_one_data_folder_and_a_save_folder_that_exists(qtbot, tiny_llama_dir, tmp_path, monkeypatch):
    """Pasted text and adapters went to ~/.local/share/LoRA-Lab/LoRA-Lab while models used ~/.local/share/lora-lab;
    the save dialog offered ~/Documents where it did not exist."""
    from PySide6.QtCore import QStandardPaths

    from app.corpus_controller import save_pasted
    from app.widgets.plan_wizard import default_out_dir
    from engine.model.references import models_dir

    home = data_dir()
    assert home == tmp_path / "lora-lab-home" and models_dir().parent == home
    assert save_pasted("some text to train on").parent == home / "pasted"
    assert default_out_dir("tiny").parent == home / "adapters"
    nowhere = tmp_path / "no-such-documents-folder"
    monkeypatch.setattr(QStandardPaths, "writableLocation", lambda _kind: str(nowhere))
    window = _window(qtbot, tiny_llama_dir)
    window.adapter_dir = make_adapter(tiny_llama_dir, tmp_path / "an-adapter", seed=5)
    window.open_save()
    assert window.dialogs["save"].folder.text() == str(Path.home())


def test_train_is_the_one_path_from_no_corpus_to_the_plan(qtbot, tiny_llama_dir, tmp_path):
    """The header's Train only switched to the console tab while training started from Plan; a pause left the
    status bar saying 'training'."""
    window = _window(qtbot, tiny_llama_dir)
    assert window.corpus is None and window.buttons["Train"].isEnabled()
    qtbot.mouseClick(window.buttons["Train"], Qt.LeftButton)
    dialog = window.dialogs["corpus"]
    assert "plan" not in window.dialogs
    data = tmp_path / "train.txt"
    data.write_text("LoRA adds a low rank update to frozen weights.\n" * 20, encoding="utf-8")
    with qtbot.waitSignal(window.corpus_controller.loaded, timeout=30000):
        window.corpus_controller.add([data])
    qtbot.waitUntil(lambda: not window.corpus_controller.running, timeout=10000)
    qtbot.mouseClick(dialog.buttons.button(QDialogButtonBox.Ok), Qt.LeftButton)
    assert window.corpus is not None and window.dialogs["plan"].isVisible()
    window.training.paused_changed.emit(True)
    assert window.state_label.text() == "training paused"
