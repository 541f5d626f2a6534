"""Shows what the loaded base model is: name, architecture and size, read from its config."""
from __future__ import annotations

from PySide6.QtWidgets import QFormLayout, QGroupBox, QLabel

from engine.model.spec import ModelSpec


class ModelInfo(QGroupBox):
    def __init__(self, parent=None):
        super().__init__("Model", parent)
        self._labels = {}
        form = QFormLayout(self)
        for key in ("name", "architecture", "parameters", "layers", "context"):
            # Wrapped: a long path or message must not widen the window past the screen.
            self._labels[key] = QLabel("—", wordWrap=True)
            self._labels[key].setObjectName(f"model-{key}")
            form.addRow(key.capitalize() + ":", self._labels[key])
        self.error = QLabel(objectName="model-error", wordWrap=True)
        self.error.setStyleSheet("color: #b00020")
        self.error.hide()
        form.addRow(self.error)
        self._loaded = False

    def show_model(self, name: str, spec: ModelSpec) -> None:
        self._loaded = True
        self.error.hide()
        self._labels["name"].setText(name)
        self._labels["architecture"].setText(
            f"{spec.model_type}, hidden {spec.hidden}, {spec.heads} heads / {spec.kv_heads} KV, vocab {spec.vocab_size}")
        self._labels["parameters"].setText(f"{spec.parameter_count() / 1e6:.1f} M")
        self._labels["layers"].setText(str(spec.layers))
        self._labels["context"].setText(f"{spec.max_positions} tokens")

    def show_error(self, message: str) -> None:
        """A model that failed to load: the one loaded before, if any, stays shown (and in use)."""
        if self._loaded:
            self.error.setText(f"{message}. The model above is still loaded.")
        else:
            self.error.setText(message)
            self._labels["name"].setText("not loaded")
        self.error.show()
