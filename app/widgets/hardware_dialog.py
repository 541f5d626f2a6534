"""The hardware inspector: every wgpu adapter with its details, CPU and memory, and the Benchmark button."""
from __future__ import annotations

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (QDialog, QDialogButtonBox, QHBoxLayout, QHeaderView, QLabel, QPushButton, QTableWidget,
                               QTableWidgetItem, QTreeWidget, QTreeWidgetItem, QVBoxLayout)

from app.benchmark import run_benchmarks
from app.plan import backend_explanation
from app.workers import run_in_thread


def _gib(n) -> str:
    return "unknown" if n is None else f"{n / 2**30:.1f} GiB"


class HardwareDialog(QDialog):
    benchmarked = Signal(list)     # [app.plan.Benchmark]
    failed = Signal(str, str)

    def __init__(self, hardware, model_dir=None, benchmarks=(), parent=None):
        super().__init__(parent, objectName="hardware-dialog")
        self.setWindowTitle("Hardware")
        self.resize(860, 620)
        self.hardware, self.model_dir, self.benchmarks = hardware, model_dir, list(benchmarks)
        self.adapters = QTreeWidget(objectName="adapters")
        self.adapters.setHeaderLabels(["Adapter / property", "Value"])
        self.adapters.setColumnWidth(0, 320)
        self.system = QLabel(objectName="system", wordWrap=True)
        self.results = QTableWidget(0, 3, objectName="benchmark-results")
        self.results.setHorizontalHeaderLabels(["Candidate", "GFLOP/s", "What was measured (model, shape)"])
        self.results.horizontalHeader().setStretchLastSection(True)
        # What was measured is said in full: wrapped, each row as tall as its text at the column's width.
        self.results.setWordWrap(True)
        self.results.verticalHeader().setSectionResizeMode(QHeaderView.ResizeToContents)
        self.explanation = QLabel(objectName="backend-explanation", wordWrap=True)
        self.status = QLabel(objectName="benchmark-status")
        self.benchmark = QPushButton("Benchmark", objectName="benchmark")
        self.benchmark.setToolTip("Run the engine's micro-benchmark on every adapter and the CPU backend on the "
                                  "loaded model; the plan wizard uses the results for its ETA")
        buttons = QDialogButtonBox(QDialogButtonBox.Close)
        buttons.rejected.connect(self.reject)
        row = QHBoxLayout()
        row.addWidget(self.benchmark)
        row.addWidget(self.status, 1)
        layout = QVBoxLayout(self)
        layout.addWidget(self.adapters, 2)
        layout.addWidget(self.system)
        layout.addLayout(row)
        layout.addWidget(self.results, 1)
        layout.addWidget(self.explanation)
        layout.addWidget(buttons)
        self.benchmark.clicked.connect(self.run_benchmark)
        self.show_hardware(hardware)
        self.show_benchmarks(self.benchmarks)

    def show_hardware(self, hw) -> None:
        self.hardware = hw
        self.adapters.clear()
        if hw is None:
            self.system.setText("detecting hardware…")
            return
        for a in hw.adapters:
            item = QTreeWidgetItem([a.name, f"{a.backend} · {a.adapter_type}" + (" · software" if a.software else "")])
            for key, value in (("vendor", a.vendor), ("backend", a.backend), ("type", a.adapter_type),
                               ("driver", a.driver or "—"), ("memory", _gib(a.memory_bytes)),
                               ("features of interest", ", ".join(a.features) or "none"),
                               ("all features", ", ".join(a.all_features) or "none")):
                QTreeWidgetItem(item, [key, value])
            limits = QTreeWidgetItem(item, ["limits", ""])
            for key, value in a.limits.items():
                QTreeWidgetItem(limits, [key, f"{value:,}"])
            self.adapters.addTopLevelItem(item)
            item.setExpanded(True)
        if not hw.adapters:
            self.adapters.addTopLevelItem(QTreeWidgetItem(["no wgpu adapter", "; ".join(hw.errors) or "—"]))
        cores = f"{hw.cpu_cores_physical} cores / {hw.cpu_cores_logical} threads" if hw.cpu_cores_physical \
            else f"{hw.cpu_cores_logical} threads"
        versions = ", ".join(f"{k} {v}" for k, v in hw.versions.items() if v)
        self.system.setText(f"CPU: {hw.cpu_model}, {cores}. RAM: {_gib(hw.ram_bytes)} "
                            f"({_gib(hw.ram_available_bytes)} available). {hw.os}, Python {hw.python}. {versions}")
        self.explanation.setText(backend_explanation(hw, self.benchmarks))

    def show_benchmarks(self, results) -> None:
        self.benchmarks = list(results)
        self.results.setRowCount(len(self.benchmarks))
        for row, b in enumerate(self.benchmarks):
            name = b.name + (" (software)" if b.software else "")
            for col, text in enumerate((name, f"{b.gflops:.2f}" if b.gflops else "—", b.detail)):
                item = QTableWidgetItem(text)
                item.setToolTip(text)
                self.results.setItem(row, col, item)
        self.results.resizeColumnsToContents()
        self.explanation.setText(backend_explanation(self.hardware, self.benchmarks))

    def run_benchmark(self) -> None:
        self.benchmark.setEnabled(False)
        self.status.setText("benchmarking…")

        def done(results):
            self.show_benchmarks(results)
            self.status.setText("done")
            self.benchmarked.emit(results)

        def failed(message, detail):
            self.status.setText(f"benchmark failed: {message}")
            self.failed.emit(message, detail)

        run_in_thread(self, run_benchmarks, self.hardware, self.model_dir, on_result=done, on_error=failed,
                      on_progress=self.status.setText, on_done=lambda: self.benchmark.setEnabled(True))
