"""The main window opens on a model, shows the hardware, remembers its geometry, quits cleanly."""
import pytest

from app.main_window import MainWindow
from tests.gui_helpers import isolated_settings  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.gui


def test_window_shows_model_and_hardware(qtbot, tiny_llama_dir, tmp_path):
    window = MainWindow(str(tiny_llama_dir))
    qtbot.addWidget(window)
    window.show()
    with qtbot.waitSignal(window.model_loaded, timeout=30000):
        pass
    qtbot.waitUntil(lambda: window.hardware is not None, timeout=30000)
    assert window.findChild(object, "model-layers").text() == "2"
    assert "GiB RAM" in window.hardware_label.text()
    shot = tmp_path / "main-window.png"
    assert window.grab().save(str(shot)) and shot.stat().st_size > 1000


def test_bad_model_is_reported_in_window(qtbot, tmp_path):
    window = MainWindow(str(tmp_path / "missing"))
    qtbot.addWidget(window)
    qtbot.waitUntil(lambda: "not loaded" in window.findChild(object, "model-name").text(), timeout=30000)
    assert "not found" in window.log.toPlainText()


def test_geometry_is_remembered(qtbot):
    window = MainWindow()
    qtbot.addWidget(window)
    window.show()
    # The offscreen screen is 800 px wide, narrower than the window's minimum: only the height can vary freely.
    window.resize(window.width(), 540)
    window.close()
    again = MainWindow()
    qtbot.addWidget(again)
    assert again.height() == 540


def test_a_bad_model_folder_keeps_the_loaded_model_and_the_window_width(qtbot, tiny_llama_dir, tmp_path):
    """A raw `ValueError: …` and a traceback; the window widened past the screen; the header showed the bad path
    while Plan still used the old model."""
    window = MainWindow(str(tiny_llama_dir))
    qtbot.addWidget(window)
    window.show()
    with qtbot.waitSignal(window.model_loaded, timeout=30000):
        pass
    width = window.width()
    bad = tmp_path / ("not-a-model-folder-with-a-long-name-" * 5)
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
    window.load_model(str(bad))
    error = window.findChild(object, "model-error")
    qtbot.waitUntil(lambda: error.isVisible() and bool(error.text()), timeout=30000)
    assert error.text().startswith("could not load that model: ") and "ValueError" not in error.text()
    assert "still loaded" in error.text() and "config.json lacks num_attention_heads" in error.text()
    assert window.findChild(object, "model-layers").text() == "2" and window.model_dir == tiny_llama_dir
    assert window.picker.current_ref() == str(tiny_llama_dir)
    assert "Traceback" not in window.log.toPlainText()
    qtbot.wait(50)
    assert window.width() == width
