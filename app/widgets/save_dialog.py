"""The save-adapter dialog: a folder, the formats (PEFT by default, GGUF + Modelfile, merged), then a summary."""
from __future__ import annotations

import html
from pathlib import Path

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (QCheckBox, QDialog, QDialogButtonBox, QFileDialog, QFormLayout, QHBoxLayout, QLabel,
                               QLineEdit, QPushButton, QTextBrowser, QVBoxLayout)

from app.save import SaveRequest, save_adapter
from app.workers import run_in_thread


class SaveDialog(QDialog):
    failed = Signal(str, str)     # message, detail: the window's log gets them too
    saved = Signal(list)          # the summary lines
    def __init__(self, adapter: Path, base_model: str, folder: Path, parent=None):
        super().__init__(parent, objectName="save-dialog")
        self.setWindowTitle("Save adapter")
        self.resize(720, 460)
        self.adapter, self.base_model = Path(adapter), base_model
        self.folder = QLineEdit(str(folder), objectName="save-folder")
        browse = QPushButton("Choose…", objectName="save-browse")
        self.peft = QCheckBox("PEFT adapter (transformers / peft)", objectName="save-peft", checked=True)
        self.gguf = QCheckBox("GGUF adapter + Ollama Modelfile (llama.cpp, Ollama)", objectName="save-gguf")
        self.merged = QCheckBox("Merged model (base weights with the adapter folded in)", objectName="save-merged")
        self.summary = QTextBrowser(objectName="save-summary")
        self.status = QLabel(objectName="save-status")
        self.buttons = QDialogButtonBox(QDialogButtonBox.Save | QDialogButtonBox.Close)
        self.buttons.button(QDialogButtonBox.Save).setObjectName("save-run")
        row = QHBoxLayout()
        row.addWidget(self.folder, 1)
        row.addWidget(browse)
        form = QFormLayout()
        form.addRow("Adapter:", QLabel(str(self.adapter), objectName="save-adapter"))
        form.addRow("Base model:", QLabel(base_model))
        form.addRow("Save into:", row)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        for box in (self.peft, self.gguf, self.merged):
            layout.addWidget(box)
        layout.addWidget(self.status)
        layout.addWidget(self.summary, 1)
        layout.addWidget(self.buttons)
        browse.clicked.connect(self._browse)
        self.buttons.accepted.connect(self.save)
        self.buttons.rejected.connect(self.reject)
        self.written: list[str] = []

    def _browse(self):
        folder = QFileDialog.getExistingDirectory(self, "Save the adapter into", self.folder.text())
        if folder:
            self.folder.setText(folder)

    def save(self):
        try:
            request = SaveRequest(self.adapter, self.base_model, Path(self.folder.text().strip()),
                                  self.peft.isChecked(), self.gguf.isChecked(), self.merged.isChecked())
        except (ValueError, OSError) as exc:
            self.status.setText(f"<b>{html.escape(str(exc))}</b>")
            self.failed.emit(str(exc), "")
            return
        self.buttons.button(QDialogButtonBox.Save).setEnabled(False)
        self.status.setText("saving…")

        # The button comes back in the same slot that reports the outcome, so whoever sees the outcome
        # (a user, a test) can save again at once.
        def done(lines):
            self.buttons.button(QDialogButtonBox.Save).setEnabled(True)
            self.written = lines
            self.summary.setPlainText("\n".join(lines))
            self.status.setText(f"saved into {request.folder}")
            self.saved.emit(lines)

        def failed(message, detail):
            self.buttons.button(QDialogButtonBox.Save).setEnabled(True)
            self.status.setText(f"<b>save failed:</b> {html.escape(message)}")
            self.failed.emit(message, detail)

        run_in_thread(self, save_adapter, request, on_result=done, on_error=failed, on_progress=self.status.setText)
