"""The runs trained before (engine.train.history): adapter, base, steps and losses; double-click answers with one."""
from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QGroupBox, QTreeWidget, QTreeWidgetItem, QVBoxLayout

from engine.train.history import RunRecord


def _number(value, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and not isinstance(value, bool) else "—"


def run_row(record: RunRecord) -> list[str]:
    """The figures a row shows: adapter, base model, steps done of planned, loss first -> final, when."""
    m = record.metrics
    steps = f"{_number(m.get('steps'), ',')}/{_number(m.get('total_steps'), ',')}"
    loss = f"{_number(m.get('first_loss'), '.3f')} → {_number(m.get('final_loss'), '.3f')}"
    return [record.name, Path(record.model).name, steps, loss, record.finished_at.replace("T", " ").rstrip("Z")]


def run_tooltip(record: RunRecord) -> str:
    plan, m = record.plan, record.metrics
    lora = plan.get("lora", {}) if isinstance(plan.get("lora"), dict) else {}
    lines = [f"adapter: {record.adapter_dir}", f"base model: {record.model_dir}",
             "corpus: " + (", ".join(record.corpus) or "—"),
             (f"plan: rank {lora.get('rank', '—')}, lr {plan.get('lr', '—')}, epochs {plan.get('epochs', '—')}, "
             f"batch {plan.get('batch_size', '—')} × {plan.get('seq_len', '—')} tokens"),
             (f"validation perplexity: {_number(m.get('eval_perplexity'), '.3f')}; backend: {m.get('backend', '—')}"
              + ("; stopped before its end" if m.get("stopped") else ""))]
    return "\n".join(lines)


class RunsList(QGroupBox):
    chosen = Signal(str)        # the adapter folder of the run double-clicked

    def __init__(self, parent=None):
        super().__init__("Runs", parent)
        self.tree = QTreeWidget(objectName="runs")
        self.tree.setHeaderLabels(["Adapter", "Base", "Steps", "Loss", "Finished (UTC)"])
        self.tree.setRootIsDecorated(False)
        self.tree.setMaximumHeight(150)     # a few runs in view; the log below keeps its room
        self.tree.setToolTip("Training runs of earlier sessions and this one; double-click one to chat with it")
        self.tree.itemDoubleClicked.connect(lambda item, _col: self.chosen.emit(item.data(0, Qt.UserRole)))
        QVBoxLayout(self).addWidget(self.tree)

    def show_runs(self, records: list[RunRecord]) -> None:
        """Newest first."""
        self.tree.clear()
        for record in reversed(records):
            item = QTreeWidgetItem(run_row(record))
            item.setData(0, Qt.UserRole, record.adapter_dir)
            item.setToolTip(0, run_tooltip(record))
            self.tree.addTopLevelItem(item)
        for column in range(1, self.tree.columnCount()):
            self.tree.resizeColumnToContents(column)
