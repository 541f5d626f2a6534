"""Generation settings (max tokens, temperature, top-p, top-k, repetition penalty, seed) as a small form."""
from __future__ import annotations

from dataclasses import asdict

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QDoubleSpinBox, QFormLayout, QGroupBox, QSpinBox

from engine.chat.generation import GenerationSettings


class GenerationSettingsBox(QGroupBox):
    changed = Signal(object)   # GenerationSettings

    def __init__(self, parent=None):
        super().__init__("Generation", parent)
        form = QFormLayout(self)
        self.max_new_tokens = QSpinBox(minimum=1, maximum=32768, objectName="gen-max-new-tokens")
        self.temperature = QDoubleSpinBox(minimum=0.0, maximum=10.0, singleStep=0.05, decimals=2,
                                          objectName="gen-temperature")
        self.temperature.setToolTip("0 = greedy decoding (deterministic)")
        self.top_p = QDoubleSpinBox(minimum=0.01, maximum=1.0, singleStep=0.05, decimals=2, objectName="gen-top-p")
        self.top_k = QSpinBox(minimum=0, maximum=100000, objectName="gen-top-k")
        self.top_k.setToolTip("0 disables top-k")
        self.repetition_penalty = QDoubleSpinBox(minimum=0.01, maximum=10.0, singleStep=0.05, decimals=2,
                                                 objectName="gen-repetition-penalty")
        # -1 stands for "no seed" (a fresh random answer every time): a spin box cannot hold None.
        self.seed = QSpinBox(minimum=-1, maximum=2**31 - 1, objectName="gen-seed", specialValueText="random")
        for label, widget in (("Max new tokens", self.max_new_tokens), ("Temperature", self.temperature),
                              ("Top-p", self.top_p), ("Top-k", self.top_k),
                              ("Repetition penalty", self.repetition_penalty), ("Seed", self.seed)):
            form.addRow(label + ":", widget)
            widget.valueChanged.connect(self._emit)
        self.set_settings(GenerationSettings())

    def settings(self) -> GenerationSettings:
        seed = self.seed.value()
        return GenerationSettings(self.max_new_tokens.value(), self.temperature.value(), self.top_p.value(),
                                  self.top_k.value(), self.repetition_penalty.value(), None if seed < 0 else seed)

    def set_settings(self, s: GenerationSettings) -> None:
        widgets = (self.max_new_tokens, self.temperature, self.top_p, self.top_k, self.repetition_penalty, self.seed)
        for w in widgets:
            w.blockSignals(True)
        self.max_new_tokens.setValue(s.max_new_tokens)
        self.temperature.setValue(s.temperature)
        self.top_p.setValue(s.top_p)
        self.top_k.setValue(s.top_k)
        self.repetition_penalty.setValue(s.repetition_penalty)
        self.seed.setValue(-1 if s.seed is None else s.seed)
        for w in widgets:
            w.blockSignals(False)

    def _emit(self, *_):
        self.changed.emit(self.settings())


def settings_to_dict(s: GenerationSettings) -> dict:
    return asdict(s)


def settings_from_dict(data) -> GenerationSettings:
    """Settings saved earlier (QSettings); anything unreadable falls back to the defaults."""
    try:
        return GenerationSettings(**{k: data[k] for k in asdict(GenerationSettings()) if k in data})
    except (TypeError, ValueError, KeyError):
        return GenerationSettings()
