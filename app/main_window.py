"""The LoRA-Lab main window: header with the model and actions, panels, and a status bar with the hardware."""
from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QByteArray, QSettings, Qt, Signal
from PySide6.QtGui import QIcon
from PySide6.QtWidgets import QLabel, QMainWindow, QMessageBox, QPlainTextEdit, QSplitter, QVBoxLayout, QWidget

from app.workers import run_in_thread
from app.widgets.model_info import ModelInfo
from engine.hardware import detect
from engine.model_spec import load_model_spec
from engine.models import resolve_model
from resources import resource_path


class MainWindow(QMainWindow):
    model_loaded = Signal(str)          # the resolved model folder
    hardware_ready = Signal(object)     # engine.hardware.HardwareReport

    def __init__(self, model_ref: str | None = None):
        super().__init__()
        self.setWindowTitle("LoRA-Lab")
        self.setWindowIcon(QIcon(str(resource_path("lora-lab.svg"))))
        self.model_dir: Path | None = None
        self.hardware = None

        self.model_info = ModelInfo()
        self.log = QPlainTextEdit(readOnly=True, objectName="log")
        self.log.setMaximumBlockCount(5000)
        left = QWidget()
        layout = QVBoxLayout(left)
        layout.addWidget(self.model_info)
        layout.addWidget(QLabel("Log"))
        layout.addWidget(self.log)
        self.splitter = QSplitter(Qt.Horizontal)
        self.splitter.addWidget(left)
        self.setCentralWidget(self.splitter)

        self.hardware_label = QLabel("detecting hardware…", objectName="hardware")
        self.state_label = QLabel("idle", objectName="engine-state")
        self.statusBar().addWidget(self.hardware_label, 1)
        self.statusBar().addPermanentWidget(self.state_label)

        self._restore_geometry()
        run_in_thread(self, detect, on_result=self._on_hardware, on_error=self._on_error)
        if model_ref:
            self.load_model(model_ref)

    # ---- model --------------------------------------------------------------------------------------------
    def load_model(self, ref: str) -> None:
        self.append_log(f"loading model {ref}")
        self.state_label.setText("loading model")
        run_in_thread(self, _resolve_and_read, ref, on_result=self._on_model, on_error=self._on_model_error)

    def _on_model(self, result) -> None:
        folder, spec = result
        self.model_dir = Path(folder)
        self.model_info.show_model(self.model_dir.name, spec)
        self.state_label.setText("idle")
        self.append_log(f"model ready: {folder}")
        QSettings().setValue("model/last", str(folder))
        self.model_loaded.emit(str(folder))

    def _on_model_error(self, message: str, detail: str) -> None:
        self.model_info.show_error(message)
        self.state_label.setText("idle")
        self._on_error(message, detail)

    # ---- hardware -----------------------------------------------------------------------------------------
    def _on_hardware(self, report) -> None:
        self.hardware = report
        self.hardware_label.setText(report.summary())
        self.hardware_ready.emit(report)

    # ---- messages -----------------------------------------------------------------------------------------
    def append_log(self, text: str) -> None:
        self.log.appendPlainText(text)

    def _on_error(self, message: str, detail: str) -> None:
        self.append_log(f"error: {message}\n{detail}")
        self.statusBar().showMessage(message, 15000)
        if self.isVisible():
            QMessageBox.warning(self, "LoRA-Lab", message)

    # ---- geometry -----------------------------------------------------------------------------------------
    def _restore_geometry(self) -> None:
        geometry = QSettings().value("window/geometry")
        if isinstance(geometry, QByteArray) and not geometry.isEmpty():
            self.restoreGeometry(geometry)
        else:
            self.resize(1280, 820)

    def closeEvent(self, event) -> None:
        QSettings().setValue("window/geometry", self.saveGeometry())
        super().closeEvent(event)


def _resolve_and_read(ref: str):
    folder = resolve_model(ref)
    return folder, load_model_spec(folder)
