"""The corpus dialog: drop or pick files and folders, paste text, read them with the model's tokenizer, and see
exactly what will be trained on (per-file table, skipped lines, rendered examples with masked tokens dimmed; for
preference pairs, the prompt, chosen and rejected tokens each in their own shade)."""
from __future__ import annotations

import html
from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QKeySequence, QShortcut
from PySide6.QtWidgets import (QDialog, QDialogButtonBox, QDoubleSpinBox, QFileDialog, QFormLayout, QHBoxLayout,
                               QLabel, QMenu, QMessageBox, QPlainTextEdit, QProgressBar, QPushButton, QSpinBox,
                               QSplitter, QTableWidget, QTableWidgetItem, QTextBrowser, QToolButton, QVBoxLayout,
                               QWidget)

from app.corpus_controller import CorpusController, recent_corpora, save_pasted
from app.plan import is_preference_corpus

COLUMNS = ["File", "Format", "Records", "Tokens", "Trainable", "Skipped"]
SKIPPED_COLUMN = 5


def preview_html(pieces: list[tuple[str, bool]]) -> str:
    """Rendered example: trained tokens highlighted, masked ones grey (text escaped: it is data, not markup)."""
    out = []
    for text, trained in pieces:
        body = html.escape(text).replace("\n", "<br>")
        style = "background:#d9f2d9;color:#0a3d0a" if trained else "color:#8a8a8a"
        out.append(f'<span style="{style}">{body}</span>')
    return "<div style='font-family:monospace'>" + "".join(out) + "</div>"


# Preference pairs: the shared prompt, the chosen and the rejected completion each in their own shade; within a
# shade, tokens alternate between two tones so each token's extent shows.
PAIR_SHADES = {"prompt": ("#ececec", "#dcdcdc"), "chosen": ("#d9f2d9", "#bfe6bf"), "rejected": ("#f8dcdc", "#efc2c2")}
PAIR_LEGEND = ("<span style='background:#dcdcdc'>prompt</span> · <span style='background:#bfe6bf'>chosen</span> · "
               "<span style='background:#efc2c2'>rejected</span> · <span style='color:#8a8a8a'>not counted</span> "
               "(each token its own tone)")
SFT_LEGEND = ("<span style='background:#d9f2d9'>trained</span> · "
              "<span style='color:#8a8a8a'>masked (context only)</span>")


def pair_preview_html(pieces: dict[str, list[tuple[str, bool]]]) -> str:
    """A preference pair (PreferenceCorpus.preview): the prompt once, then the chosen and the rejected
    completion, token by token in their shades (text escaped: it is data, not markup)."""
    blocks = []
    for part, title in (("prompt", "Prompt"), ("chosen", "Chosen"), ("rejected", "Rejected")):
        tokens = pieces[part]
        counted = sum(trained for _, trained in tokens)
        spans = []
        for i, (text, trained) in enumerate(tokens):
            body = html.escape(text).replace("\n", "↵<br>")
            style = (f"background:{PAIR_SHADES[part][i % 2]}" if trained or part == "prompt" else "color:#8a8a8a")
            spans.append(f'<span style="{style}">{body}</span>')
        what = f"{len(tokens)} tokens" + (f", {counted} counted" if part != "prompt" else ", shared by both")
        blocks.append(f"<p><b>{title}</b> ({what})</p><div style='font-family:monospace'>{''.join(spans)}</div>")
    return "".join(blocks)


def format_label(fs) -> str:
    if fs.refused is not None:
        return "refused"
    kinds = ", ".join(f"{k} ({v})" for k, v in sorted(fs.formats.items()))
    return f"{fs.container}: {kinds}" if kinds else fs.container


class CorpusDialog(QDialog):
    accepted_corpus = Signal(object)     # engine.corpus.Corpus

    def __init__(self, controller: CorpusController, model_dir: Path | None, parent=None):
        super().__init__(parent, objectName="corpus-dialog")
        self.setWindowTitle("Corpus")
        self.resize(1000, 720)
        self.setAcceptDrops(True)
        self.controller, self.model_dir = controller, model_dir
        corpus = controller.corpus
        self._attempted = [Path(f.path) for f in corpus.stats.files] if corpus is not None else None
        self._build_sources()
        self._build_reading()
        self._build_results()
        self._build_layout()
        self._connect()
        # The controller outlives the dialog: show what it already holds (files added, corpus read, a read running).
        self._show_files(controller.files)
        if controller.corpus is not None:
            self._show_corpus(controller.corpus)
        self._on_running(controller.running)

    def _build_sources(self):
        self.add_files = QPushButton("Add files…", objectName="corpus-add-files")
        self.add_folder = QPushButton("Add folder…", objectName="corpus-add-folder")
        self.recent = QToolButton(objectName="corpus-recent", text="Recent")
        self.recent.setPopupMode(QToolButton.InstantPopup)
        self.recent.setMenu(QMenu(self.recent))
        self.drop_hint = QLabel("…or drop files and folders here", objectName="drop-hint")
        self.paste = QPlainTextEdit(objectName="corpus-paste", placeholderText="Paste text or JSONL records here")
        self.paste.setMaximumHeight(80)
        self.add_paste = QPushButton("Add pasted text", objectName="corpus-add-paste")

    def _build_reading(self):
        self.seq_len = QSpinBox(minimum=16, maximum=32768, value=512, singleStep=64, objectName="corpus-seq-len")
        # 0 leaves the split to the plan (engine.train.recommend: none under 50 examples, else 10 %).
        self.val_split = QDoubleSpinBox(minimum=0.0, maximum=0.5, singleStep=0.05, value=0.0, decimals=2,
                                        objectName="corpus-val-split", specialValueText="planned")
        self.read = QPushButton("Read corpus", objectName="corpus-read")
        self.cancel = QPushButton("Cancel reading", objectName="corpus-cancel")
        self.progress = QProgressBar(objectName="corpus-progress")

    def _build_results(self):
        self.table = QTableWidget(0, len(COLUMNS), objectName="corpus-table")
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.setEditTriggers(QTableWidget.NoEditTriggers)
        self.table.setSelectionBehavior(QTableWidget.SelectRows)
        self.table.setTextElideMode(Qt.ElideMiddle)      # a long path must not push the numbers off-screen
        self.table.setContextMenuPolicy(Qt.CustomContextMenu)
        self.table.setToolTip("Click a file's Skipped cell to see each skipped line and why; Delete or the "
                              "context menu removes a file")
        self.totals = QLabel(objectName="corpus-totals", wordWrap=True)
        self.preview = QTextBrowser(objectName="corpus-preview")
        self.example = QSpinBox(minimum=0, maximum=0, objectName="corpus-example")
        self.buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Close)
        self.buttons.button(QDialogButtonBox.Ok).setText("Use this corpus")
        self.buttons.button(QDialogButtonBox.Ok).setObjectName("corpus-use")

    def _build_layout(self):
        sources = QHBoxLayout()
        sources.addWidget(self.add_files)
        sources.addWidget(self.add_folder)
        sources.addWidget(self.recent)
        sources.addWidget(self.drop_hint, 1)
        paste_row = QHBoxLayout()
        paste_row.addWidget(self.paste, 1)
        paste_row.addWidget(self.add_paste)
        settings = QFormLayout()
        settings.addRow("Sequence length (tokens):", self.seq_len)
        settings.addRow("Validation split:", self.val_split)
        run_row = QHBoxLayout()
        run_row.addLayout(settings)
        run_row.addWidget(self.read)
        run_row.addWidget(self.cancel)
        run_row.addWidget(self.progress, 1)
        split = QSplitter(Qt.Vertical)
        split.addWidget(self.table)
        split.addWidget(self._preview_box())
        layout = QVBoxLayout(self)
        layout.addLayout(sources)
        layout.addLayout(paste_row)
        layout.addLayout(run_row)
        layout.addWidget(split, 1)
        layout.addWidget(self.totals)
        layout.addWidget(self.buttons)

    def _preview_box(self) -> QWidget:
        """The example picker, the trained/masked legend, and the rendered example under them."""
        box = QWidget()
        layout = QVBoxLayout(box)
        layout.setContentsMargins(0, 0, 0, 0)
        example_row = QHBoxLayout()
        self.example_label = QLabel("Example (training sequence):")
        self.legend = QLabel(SFT_LEGEND, objectName="corpus-legend")
        example_row.addWidget(self.example_label)
        example_row.addWidget(self.example)
        example_row.addWidget(self.legend)
        example_row.addStretch(1)
        layout.addLayout(example_row)
        layout.addWidget(self.preview)
        return box

    def _connect(self):
        self.recent.menu().aboutToShow.connect(self._fill_recent)
        self.add_files.clicked.connect(self._pick_files)
        self.add_folder.clicked.connect(self._pick_folder)
        self.add_paste.clicked.connect(self._add_paste)
        self.read.clicked.connect(self.read_corpus)
        self.cancel.clicked.connect(self.controller.cancel)
        self.example.valueChanged.connect(self._show_example)
        self.table.cellClicked.connect(self._cell_clicked)
        self.buttons.accepted.connect(self._use)
        self.buttons.rejected.connect(self.reject)
        # Reading starts first, so the table lists the new files as "reading…".
        self.controller.files_changed.connect(lambda _files: self._read_when_idle())
        self.controller.files_changed.connect(self._show_files)
        self.controller.progress.connect(self.progress.setValue)
        self.controller.loaded.connect(self._show_corpus)
        self.controller.failed.connect(self._failed)
        self.controller.running_changed.connect(self._on_running)
        self.controller.running_changed.connect(lambda running: running or self._read_when_idle())
        self.table.customContextMenuRequested.connect(self._table_menu)
        QShortcut(QKeySequence.Delete, self.table, activated=self.remove_selected)

    # -- sources ----------------------------------------------------------------------------------------------
    def dragEnterEvent(self, event):   # noqa: N802
        if event.mimeData().hasUrls():
            event.acceptProposedAction()

    def dropEvent(self, event):   # noqa: N802
        self.controller.add([u.toLocalFile() for u in event.mimeData().urls() if u.isLocalFile()])
        event.acceptProposedAction()

    def _pick_files(self):
        files, _ = QFileDialog.getOpenFileNames(self, "Add corpus files",
                                                filter="Corpus files (*.txt *.md *.jsonl *.ndjson *.json *.csv)")
        self.controller.add(files)

    def _pick_folder(self):
        folder = QFileDialog.getExistingDirectory(self, "Add a folder of corpus files")
        if folder:
            self.controller.add([folder])

    def _fill_recent(self):
        menu = self.recent.menu()
        menu.clear()
        for path in recent_corpora():
            if Path(path).is_file():
                menu.addAction(path, lambda p=path: self.controller.add([p]))
        if menu.isEmpty():
            menu.addAction("no recent corpus files").setEnabled(False)

    def _add_paste(self):
        text = self.paste.toPlainText()
        if text.strip():
            self.controller.add([save_pasted(text)])
            self.paste.clear()

    def remove_selected(self):
        rows = sorted({i.row() for i in self.table.selectedIndexes()}, reverse=True)
        for row in rows:
            self.controller.remove(self.controller.files[row])

    def _table_menu(self, pos):
        row = self.table.rowAt(pos.y())
        if row >= 0:
            self.row_menu(row).exec(self.table.viewport().mapToGlobal(pos))

    def row_menu(self, row: int) -> QMenu:
        """The context menu of a file's row (the row is selected: its actions apply to it)."""
        self.table.selectRow(row)
        menu = QMenu(self)
        menu.addAction("Remove from the corpus", self.remove_selected)
        return menu

    # -- reading ----------------------------------------------------------------------------------------------
    def _read_when_idle(self):
        """Files are read as they are added (or removed): the table never waits at 'not read yet' for a button.
        A change during a read is read once that read ends."""
        if self.model_dir is None or self.controller.running or not self.controller.files:
            return
        if [Path(f) for f in self.controller.files] != self._attempted:   # not after a cancel or a failure
            self.read_corpus()

    def read_corpus(self):
        if self.model_dir is None:
            self._failed("load a model first: the corpus is tokenized with the model's tokenizer", "")
            return
        self.progress.setValue(0)
        self._attempted = [Path(f) for f in self.controller.files]
        self.controller.load(self.model_dir, self.seq_len.value(), self.val_split.value())

    def _on_running(self, running: bool):
        self.read.setEnabled(not running and bool(self.controller.files))
        self.cancel.setEnabled(running)
        self.buttons.button(QDialogButtonBox.Ok).setEnabled(not running and self.controller.corpus is not None)

    def _failed(self, message: str, detail: str):
        self.totals.setText(f"<b>{html.escape(message)}</b>")
        if self.isVisible():
            QMessageBox.warning(self, "Corpus", message)

    # -- results ----------------------------------------------------------------------------------------------
    def _show_files(self, files):
        stats = {Path(f.path): f for f in self.controller.corpus.stats.files} if self.controller.corpus else {}
        self.table.setRowCount(len(files))
        for row, path in enumerate(files):
            fs = stats.get(Path(path))
            if fs is None:
                cells = [str(path), "reading…" if self.controller.running else "not read yet", "", "", "", ""]
            elif fs.refused is not None:      # the reason where it is read, not only in a tooltip
                cells = [str(path), "refused", "", "", "", f"whole file: {fs.refused}"]
            else:
                cells = [str(path), format_label(fs), f"{fs.records:,}", f"{fs.tokens:,}", f"{fs.trainable_tokens:,}",
                         f"{fs.skipped_count:,}" + (" — click" if fs.skipped_count else "")]
            for col, text in enumerate(cells):
                item = QTableWidgetItem(text)
                item.setToolTip(fs.refused if fs is not None and fs.refused is not None else
                                str(path) if col == 0 else "")
                self.table.setItem(row, col, item)
        self.table.resizeColumnsToContents()
        # The path column gets what the numbers leave; the rest of a long path is elided, in its tooltip.
        self.table.setColumnWidth(0, min(self.table.columnWidth(0), max(200, self.width() // 2)))
        self._on_running(self.controller.running)

    def _show_corpus(self, corpus):
        self._show_files(self.controller.files)
        t = corpus.stats.totals
        train, val = corpus.stats.train, corpus.stats.val
        pairs = is_preference_corpus(corpus)
        self.example_label.setText("Pair (training):" if pairs else "Example (training sequence):")
        self.legend.setText(PAIR_LEGEND if pairs else SFT_LEGEND)
        if pairs:
            self.totals.setText(
                f"Preference pairs (for DPO/ORPO): {t['files']} file(s), {t['records']:,} pairs read, "
                f"{t['skipped']:,} refused (click a file's Skipped cell for each line and reason), "
                f"{t['refused_files']} file(s) refused; {t['truncated_records']:,} pairs cut to "
                f"{corpus.config.seq_len} tokens. Training: {len(corpus.train):,} pairs "
                f"({train.trainable_tokens:,} completion tokens); "
                f"validation: {len(corpus.val):,} pairs."
                + "".join(f" Note: {html.escape(n)}" for n in corpus.stats.notes))
        else:
            self.totals.setText(
                f"Totals: {t['files']} file(s), {t['records']:,} records, {t['tokens']:,} tokens, "
                f"{t['trainable_tokens']:,} trainable, {t['skipped']:,} skipped, {t['refused_files']} refused. "
                f"Training: {train.sequences:,} sequences ({train.trainable_tokens:,} trained tokens); "
                f"validation: {val.sequences:,} sequences ({val.trainable_tokens:,} trained tokens)."
                + "".join(f" Note: {html.escape(n)}" for n in corpus.stats.notes))
        self.example.blockSignals(True)
        self.example.setMaximum(max(0, len(corpus.train) - 1))
        self.example.setValue(0)
        self.example.blockSignals(False)
        self._show_example(0)

    def _show_example(self, index: int):
        corpus = self.controller.corpus
        if corpus is None or not corpus.train:
            self.preview.setHtml("<i>no training example</i>")
            return
        pieces = corpus.preview(index)
        self.preview.setHtml(pair_preview_html(pieces) if is_preference_corpus(corpus) else preview_html(pieces))

    def _cell_clicked(self, row: int, column: int):
        corpus = self.controller.corpus
        if column != SKIPPED_COLUMN or corpus is None:
            return
        path = self.controller.files[row]
        fs = next((f for f in corpus.stats.files if Path(f.path) == path), None)
        if fs is not None and fs.skipped_count:
            SkippedDialog(fs, self).exec()

    def _use(self):
        if self.controller.corpus is not None:
            self.accepted_corpus.emit(self.controller.corpus)
            self.accept()


class SkippedDialog(QDialog):
    """Each skipped line of one file and the reason."""

    def __init__(self, fs, parent=None):
        super().__init__(parent, objectName="skipped-dialog")
        self.setWindowTitle(f"Skipped in {Path(fs.path).name}")
        self.resize(700, 400)
        table = QTableWidget(len(fs.skipped), 2, objectName="skipped-table")
        table.setHorizontalHeaderLabels(["Line", "Reason"])
        table.horizontalHeader().setStretchLastSection(True)
        for row, s in enumerate(fs.skipped):
            table.setItem(row, 0, QTableWidgetItem(str(s.line)))
            table.setItem(row, 1, QTableWidgetItem(s.reason))
        more = fs.skipped_count - len(fs.skipped)
        buttons = QDialogButtonBox(QDialogButtonBox.Close)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addWidget(table)
        if more:
            layout.addWidget(QLabel(f"… and {more:,} more skipped records"))
        layout.addWidget(buttons)
