"""The model picker: the demo model, recent models, a folder or .gguf file, or a hub id typed in."""
from __future__ import annotations

from PySide6.QtCore import QSettings, Signal
from PySide6.QtWidgets import QComboBox, QFileDialog, QHBoxLayout, QMenu, QPushButton, QToolButton, QWidget

DEMO = "demo"
RECENT_KEY = "model/recent"
MAX_RECENT = 8


def recent_models() -> list[str]:
    value = QSettings().value(RECENT_KEY) or []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def remember_model(ref: str) -> None:
    refs = [ref] + [r for r in recent_models() if r != ref]
    QSettings().setValue(RECENT_KEY, refs[:MAX_RECENT])


class ModelPicker(QWidget):
    model_chosen = Signal(str)   # a model reference for engine.model.references.resolve_model

    def __init__(self, parent=None):
        super().__init__(parent)
        self.combo = QComboBox(objectName="model-combo", editable=True)
        self.combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.combo.setMinimumContentsLength(16)
        self.combo.setToolTip("The demo model, a recent model, a local folder or .gguf file, or a hub id "
                              "(owner/name) — type one and press Enter")
        self.combo.lineEdit().setPlaceholderText("model folder, .gguf, hub id or 'demo'")
        self.load = QPushButton("Load", objectName="model-load")
        self.browse = QToolButton(objectName="model-browse", text="Open…")
        self.browse.setPopupMode(QToolButton.InstantPopup)
        menu = QMenu(self.browse)
        menu.addAction("Model folder…", self._pick_folder)
        menu.addAction("GGUF file…", self._pick_gguf)
        self.browse.setMenu(menu)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.combo, 1)
        layout.addWidget(self.load)
        layout.addWidget(self.browse)
        self.load.clicked.connect(self._choose_current)
        self.combo.lineEdit().returnPressed.connect(self._choose_current)
        self.combo.activated.connect(lambda _: self._choose_current())
        self.refresh()

    def refresh(self, current: str | None = None) -> None:
        """Fill the list from the recent models (QSettings); the demo model is always offered."""
        self.combo.blockSignals(True)
        self.combo.clear()
        refs = recent_models()
        for ref in refs + ([DEMO] if DEMO not in refs else []):
            self.combo.addItem("Demo model (SmolLM2-135M-Instruct)" if ref == DEMO else ref, ref)
        if current is not None:
            index = self.combo.findData(current)
            if index < 0:
                self.combo.insertItem(0, current, current)
                index = 0
            self.combo.setCurrentIndex(index)
        self.combo.blockSignals(False)

    def current_ref(self) -> str:
        text = self.combo.currentText().strip()
        index = self.combo.findText(text)
        return self.combo.itemData(index) if index >= 0 else text

    def _choose_current(self) -> None:
        ref = self.current_ref()
        if ref:
            self.model_chosen.emit(ref)

    def _pick_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Open a Hugging Face model folder")
        if folder:
            self.refresh(folder)
            self.model_chosen.emit(folder)

    def _pick_gguf(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open a GGUF model", filter="GGUF models (*.gguf)")
        if path:
            self.refresh(path)
            self.model_chosen.emit(path)
