"""The LoRA-Lab main window: header (model picker and the actions), chat, training console, log, status bar.

The window wires controllers (chat, corpus, training) to dialogs and panels; the work itself happens in the
engine, in worker threads (training, evaluation and the benchmark in a child process that a worker thread waits on).
"""
from __future__ import annotations

import json
from pathlib import Path

from PySide6.QtCore import QByteArray, QSettings, QStandardPaths, Qt, Signal
from PySide6.QtGui import QIcon
from PySide6.QtWidgets import (QHBoxLayout, QLabel, QMainWindow, QMessageBox, QPlainTextEdit, QPushButton, QSplitter,
                               QTabWidget, QVBoxLayout, QWidget)

from app.chat_controller import ChatController
from app.corpus_controller import CorpusController
from app.plan import is_preference_corpus, summarize_corpus
from app.session import load_chat, save_chat
from app.training_controller import TrainingController
from app.training_process import run_in_child
from app.widgets.chat_panel import ChatPanel
from app.widgets.generation_settings import settings_from_dict, settings_to_dict
from app.widgets.model_info import ModelInfo
from app.widgets.model_picker import ModelPicker, remember_model
from app.widgets.runs_list import RunsList
from app.widgets.training_console import TrainingConsole
from app.workers import run_in_thread
from engine.backends.hardware import detect
from engine.model.spec import load_model_spec
from engine.model.references import resolve_model
from engine.train.history import RunRecord, now_utc, read_runs, record_run, summary_metrics
from resources import resource_path


class MainWindow(QMainWindow):
    model_loaded = Signal(str)          # the resolved model folder
    hardware_ready = Signal(object)     # engine.backends.hardware.HardwareReport
    evaluated = Signal(object)          # {"base": Perplexity, "adapter": Perplexity | None}

    def __init__(self, model_ref: str | None = None, chat_engine=None):
        super().__init__()
        self.setWindowTitle("LoRA-Lab")
        self.setWindowIcon(QIcon(str(resource_path("lora-lab.svg"))))
        self.setAcceptDrops(True)
        self.model_ref: str | None = None
        self.model_dir: Path | None = None
        self.spec = None
        self.hardware = None
        self.benchmarks: list = []
        self.corpus = None
        self.adapter_dir: Path | None = None
        self.dialogs: dict[str, QWidget] = {}      # the open dialog of each kind (tests and screenshots reach them)
        self._rereading_corpus = False             # the corpus being read again for a newly loaded model

        self.chat = ChatController(chat_engine, self)
        self.corpus_controller = CorpusController(self)
        self.training = TrainingController(self.chat.handover, self)

        self._build_panels(self._build_header())
        self._build_status_bar()
        self._warm_console()
        self._connect()
        self._restore_settings()
        self._restore_session()
        self._update_actions()
        run_in_thread(self, detect, on_result=self._on_hardware, on_error=self._on_error)
        if model_ref:
            self.load_model(model_ref)

    def _build_header(self) -> QHBoxLayout:
        """The model picker and one button per action; the buttons are reached by name (self.buttons["Train"]).
        Train is the one primary path: it reads a corpus if there is none, then plans and starts the run."""
        self.picker = ModelPicker()
        self.buttons = {}
        header = QHBoxLayout()
        header.addWidget(QLabel("Model:"))
        header.addWidget(self.picker, 1)
        for name, tip in (("Corpus", "Add training files and see what will be trained on"),
                          ("Train", "Plan and start a training run (asks for the corpus first if none is read)"),
                          ("Evaluate", "Perplexity of the base model and the active adapter on the corpus"),
                          ("Save Adapter", "Save the active adapter as PEFT, GGUF + Modelfile or a merged model"),
                          ("Hardware", "GPU adapters, CPU, memory and the benchmark")):
            button = QPushButton(name, objectName=f"action-{name.lower().replace(' ', '-')}")
            button.setToolTip(tip)
            self.buttons[name] = button
            header.addWidget(button)
        self.buttons["Train"].setStyleSheet("font-weight: bold")
        return header

    def _build_panels(self, header: QHBoxLayout) -> None:
        """Model info and log on the left, chat and training console as tabs on the right, under the header."""
        self.model_info = ModelInfo()
        self.log = QPlainTextEdit(readOnly=True, objectName="log")
        self.log.setMaximumBlockCount(5000)
        left = QWidget()
        left_layout = QVBoxLayout(left)
        left_layout.addWidget(self.model_info)
        self.runs_list = RunsList()
        left_layout.addWidget(self.runs_list)
        left_layout.addWidget(QLabel("Log"))
        left_layout.addWidget(self.log)
        self.chat_panel = ChatPanel(self.chat)
        self.console = TrainingConsole(self.training)
        self.tabs = QTabWidget(objectName="tabs")
        self.tabs.addTab(self.chat_panel, "Chat")
        self.tabs.addTab(self.console, "Training")
        self.splitter = QSplitter(Qt.Horizontal)
        self.splitter.addWidget(left)
        self.splitter.addWidget(self.tabs)
        self.splitter.setSizes([300, 980])
        central = QWidget()
        layout = QVBoxLayout(central)
        layout.addLayout(header)
        layout.addWidget(self.splitter, 1)
        self.setCentralWidget(central)

    def _build_status_bar(self) -> None:
        self.hardware_label = QLabel("detecting hardware…", objectName="hardware")
        self.backend_label = QLabel("training backend: auto", objectName="backend")
        self.state_label = QLabel("no model", objectName="engine-state")
        self.statusBar().addWidget(self.hardware_label, 1)
        self.statusBar().addPermanentWidget(self.backend_label)
        self.statusBar().addPermanentWidget(self.state_label)

    def _warm_console(self) -> None:
        # The console's first layout and paint (pyqtgraph's fonts and axes above all) takes ~100 ms; paying it at
        # startup keeps it out of the moment a run starts and the console comes to the front.
        self.console.resize(980, 700)
        self.console.grab()

    def _connect(self) -> None:
        self.picker.model_chosen.connect(self.load_model)
        b = self.buttons
        b["Corpus"].clicked.connect(self.open_corpus)
        b["Train"].clicked.connect(self.train)
        b["Evaluate"].clicked.connect(self.evaluate)
        b["Save Adapter"].clicked.connect(self.open_save)
        b["Hardware"].clicked.connect(self.open_hardware)
        self.chat.state_changed.connect(self.state_label.setText)
        self.chat.error.connect(self._on_error)
        self.chat.notice.connect(self._on_notice)
        # The chat is kept for the next session: after every answer (a crash loses at most the one in flight).
        self.chat.busy_changed.connect(lambda busy: busy or self._save_chat())
        self.runs_list.chosen.connect(lambda folder: self.drop_path(Path(folder)))
        self.chat.adapters_changed.connect(lambda *_: self._update_actions())
        self.chat.model_ready.connect(lambda _: self._update_actions())
        self.chat_panel.generation.changed.connect(
            lambda s: QSettings().setValue("chat/generation", json.dumps(settings_to_dict(s))))
        self.training.log.connect(self.append_log)
        self.training.failed.connect(self._on_error)
        self.training.finished.connect(self._on_trained)
        self.training.running_changed.connect(lambda _: self._update_actions())
        self.training.paused_changed.connect(
            lambda paused: self.state_label.setText("training paused" if paused else "training"))
        self.corpus_controller.failed.connect(self._on_corpus_failed)
        self.corpus_controller.loaded.connect(self._on_corpus_reread)

    def _update_actions(self) -> None:
        b, training = self.buttons, self.training.running
        b["Corpus"].setEnabled(self.model_dir is not None and not training)
        b["Train"].setEnabled(self.model_dir is not None)
        b["Train"].setToolTip("Load a model first" if self.model_dir is None else
                              "Show the run in progress" if training else
                              "Plan and start a training run" if self.corpus is not None else
                              "Choose the training files, then plan and start the run")
        # Perplexity is measured on supervised text; a corpus of preference pairs is judged by its reward
        # accuracy, which a DPO/ORPO run's validation reports.
        b["Evaluate"].setEnabled(self.corpus is not None and not training and not is_preference_corpus(self.corpus))
        b["Save Adapter"].setEnabled(self._active_adapter_dir() is not None and not training)
        self.picker.setEnabled(not training)

    # ---- model --------------------------------------------------------------------------------------------
    def load_model(self, ref: str) -> None:
        self.append_log(f"loading model {ref}")
        self.state_label.setText("loading model")
        run_in_thread(self, _resolve_and_read, ref, on_result=lambda r: self._on_model(ref, r),
                      on_error=self._on_model_error)

    def _on_model(self, ref: str, result) -> None:
        folder, spec = result
        same = self.model_dir is not None and Path(folder).resolve() == self.model_dir.resolve()
        self.model_ref, self.model_dir, self.spec = ref, Path(folder), spec
        if not same:
            self._read_corpus_again()       # tokenized for the previous model (or the last session's): read again
        self.model_info.show_model(self.model_dir.name, spec)
        self.append_log(f"model ready: {folder}")
        QSettings().setValue("model/last", ref)
        remember_model(ref)
        self.picker.refresh(ref)
        self._update_actions()
        self.model_loaded.emit(str(folder))
        if self._saved_chat is not None:
            saved, self._saved_chat = self._saved_chat, None
            if saved.get("model") == str(folder):     # the last chat comes back with its model only
                self.chat.pending_chat = saved
        # The adapters chat held come back when they fit; so do the ones trained on this model before.
        trained_here = [r.adapter_dir for r in self.runs if Path(r.model_dir).resolve() == self.model_dir.resolve()]
        self.chat.load_model(str(folder), trained_here)

    def _on_model_error(self, message: str, detail: str) -> None:
        """One readable sentence, wrapped; the previous model stays loaded and shown (header included). Only an
        unexpected failure keeps its traceback, in the log."""
        kind, _, text = message.partition(": ")
        expected = kind in EXPECTED_LOAD_ERRORS
        message = text if expected and text else message
        self.model_info.show_error(f"could not load that model: {message}")
        self.state_label.setText("no model" if self.model_dir is None else "model loaded")
        self.picker.refresh(self.model_ref)
        self._on_error(f"could not load that model: {message}", "" if expected else detail)

    # ---- hardware -----------------------------------------------------------------------------------------
    def _on_hardware(self, report) -> None:
        self.hardware = report
        self.hardware_label.setText(report.summary())
        hardware_gpus = [a for a in report.adapters if not a.software and a.backend != "OpenGL"]
        self.backend_label.setText("training backend: auto (fastest of GPU and CPU)" if hardware_gpus
                                   else "training backend: CPU (onnxruntime)")
        self.hardware_ready.emit(report)

    def open_hardware(self) -> None:
        from app.widgets.hardware_dialog import HardwareDialog

        dialog = HardwareDialog(self.hardware, self.model_dir, self.benchmarks, self)
        dialog.benchmarked.connect(self._on_benchmarks)
        dialog.failed.connect(lambda m, d: self.append_log(f"benchmark failed: {m}\n{d}"))
        self._show_dialog("hardware", dialog)

    def _on_benchmarks(self, results) -> None:
        self.benchmarks = list(results)
        for b in results:
            self.append_log(f"benchmark: {b.name}: {b.gflops:.2f} GFLOP/s {b.detail}")
        usable = [b for b in results if not b.software and b.gflops > 0]
        if usable:
            best = max(usable, key=lambda b: b.gflops)
            self.backend_label.setText(f"training backend: {best.name} (fastest measured)")

    # ---- corpus, plan, training ---------------------------------------------------------------------------
    def open_corpus(self) -> None:
        from app.widgets.corpus_dialog import CorpusDialog

        dialog = CorpusDialog(self.corpus_controller, self.model_dir, self)
        dialog.accepted_corpus.connect(self._on_corpus)
        self._show_dialog("corpus", dialog)

    def _on_corpus(self, corpus) -> None:
        self.corpus = corpus
        t = corpus.stats.totals
        unit = "preference pairs" if is_preference_corpus(corpus) else "sequences"
        self.append_log(f"corpus: {t['files']} file(s), {len(corpus.train)} training {unit}, "
                        f"{t['trainable_tokens']:,} trainable tokens")
        QSettings().setValue("corpus/last", json.dumps({
            "files": [str(f) for f in self.corpus_controller.files], "seq_len": corpus.config.seq_len,
            "val_split": corpus.config.val_fraction}))
        self._update_actions()

    def _read_corpus_again(self) -> None:
        """The corpus in use (else the last session's) read with the new model's tokenizer; files that are gone
        are left out with a note."""
        current = self.corpus
        self.corpus = self.corpus_controller.corpus = None
        if current is not None:
            files = [str(f) for f in self.corpus_controller.files]
            seq_len, val_split = current.config.seq_len, current.config.val_fraction
        else:
            try:
                last = json.loads(QSettings().value("corpus/last") or "null")
                files, seq_len, val_split = [str(f) for f in last["files"]], int(last["seq_len"]), \
                    float(last["val_split"])
            except (TypeError, KeyError, ValueError):
                return                      # no corpus was used before (or the setting is unreadable)
        present = [Path(f) for f in files if Path(f).is_file()]
        for gone in sorted(set(files) - {str(f) for f in present}):
            self.append_log(f"corpus: {gone} is gone; the corpus is read without it")
        if not present or self.corpus_controller.running:
            return
        self.corpus_controller.files = present
        self.corpus_controller.files_changed.emit(list(present))
        self._rereading_corpus = True
        self.append_log(f"corpus: reading {len(present)} file(s) again for {self.model_dir.name}…")
        self.corpus_controller.load(self.model_dir, seq_len, val_split)

    def _on_corpus_reread(self, corpus) -> None:
        if self._rereading_corpus:
            self._rereading_corpus = False
            self._on_corpus(corpus)

    def _on_corpus_failed(self, message: str, _detail: str) -> None:
        self._rereading_corpus = False
        self.append_log(f"corpus: {message}")

    def train(self) -> None:
        """The primary path: the console while a run is in progress; else the corpus dialog when nothing is read
        yet (the plan opens once it is accepted), else the plan wizard, whose last page starts the run."""
        if self.training.running:
            self.tabs.setCurrentWidget(self.console)
        elif self.corpus is None:
            self.open_corpus()
            dialog = self.dialogs.get("corpus")
            if dialog is not None:
                dialog.accepted_corpus.connect(lambda _c: self.open_plan())
        else:
            self.open_plan()

    def open_plan(self) -> None:
        from app.widgets.plan_wizard import PlanWizard

        if self.corpus is None or self.spec is None:
            return
        wizard = PlanWizard(self.model_ref, self.model_dir, self.spec, summarize_corpus(self.corpus), self.hardware,
                            self.benchmarks, self)
        wizard.run_requested.connect(self.start_training)
        wizard.job_requested.connect(self.write_job)
        self._show_dialog("plan", wizard)

    def start_training(self, request) -> None:
        self.tabs.setCurrentWidget(self.console)
        self.training.start(request)

    def write_job(self, request, folder) -> None:
        """The planned run as an accelerate + PEFT job folder (engine.train.job), written in a child process."""
        self.append_log(f"writing the job to {folder}…")

        def done(summary):
            self.append_log("\n".join(summary.lines()))
            self.statusBar().showMessage(f"job written to {folder}: see its README for the launch commands", 30000)

        run_in_thread(self, run_in_child, write_job, request, str(folder), on_result=done, on_error=self._on_error)

    def _on_trained(self, summary, perplexities) -> None:
        self.adapter_dir = Path(summary.adapter_dir)
        request = self.training.request
        record = RunRecord(str(Path(summary.adapter_dir).resolve()), request.model,
                           str(self.model_dir.resolve()), tuple(request.files),
                           request.config.to_dict(), summary_metrics(summary), now_utc())
        try:
            notes = record_run(record)
        except OSError as exc:
            notes = [f"the run could not be added to the runs list: {exc}"]
        for note in notes:
            self._on_notice(note)
        self.runs, _ = read_runs()
        self.runs_list.show_runs(self.runs)
        self.chat.refresh()
        self._update_actions()

    # ---- evaluate -----------------------------------------------------------------------------------------
    def evaluate(self) -> None:
        files = list(summarize_corpus(self.corpus).files)
        adapter = self._active_adapter_dir()
        backend = QSettings().value("train/backend", "auto")
        self.append_log(f"evaluating on {len(files)} file(s) ({backend} backend)…")
        self.buttons["Evaluate"].setEnabled(False)
        args = (str(self.model_dir), files, str(adapter) if adapter else None, self.corpus.config.seq_len, backend)

        def done(result):
            base, tuned = result
            text = f"perplexity on the corpus: base {base.perplexity:.3f} ({base.tokens} tokens)"
            if tuned is not None:
                text += f", with {adapter.name} {tuned.perplexity:.3f}"
            self.append_log(text)
            self.statusBar().showMessage(text, 30000)
            self.evaluated.emit({"base": base, "adapter": tuned})

        run_in_thread(self, run_in_child, evaluate_pair, *args, on_result=done, on_error=self._on_error,
                      on_done=self._update_actions)

    # ---- save ---------------------------------------------------------------------------------------------
    def _active_adapter_dir(self) -> Path | None:
        active = self.chat.active_adapter
        if active is not None:
            return self.chat.engine.adapter_paths.get(active)
        return self.adapter_dir

    def open_save(self) -> None:
        from app.widgets.save_dialog import SaveDialog

        adapter = self._active_adapter_dir()
        if adapter is None:
            return
        documents = Path(QStandardPaths.writableLocation(QStandardPaths.DocumentsLocation))
        folder = Path(QSettings().value("save/folder") or (documents if documents.is_dir() else Path.home()))
        dialog = SaveDialog(adapter, self.model_ref or str(self.model_dir), folder, self)
        dialog.finished.connect(lambda _: QSettings().setValue("save/folder", dialog.folder.text()))
        dialog.saved.connect(lambda lines: [self.append_log(f"saved {line}") for line in lines])
        dialog.failed.connect(lambda m, d: self.append_log(f"save failed: {m}" + (f"\n{d}" if d else "")))
        self._show_dialog("save", dialog)

    # ---- drops: an adapter folder or its .safetensors goes to chat -------------------------------------------
    def dragEnterEvent(self, event):   # noqa: N802
        if event.mimeData().hasUrls():
            event.acceptProposedAction()

    def dropEvent(self, event):   # noqa: N802
        for url in event.mimeData().urls():
            self.drop_path(Path(url.toLocalFile()))
        event.acceptProposedAction()

    def drop_path(self, path: Path) -> None:
        folder = path.parent if path.suffix == ".safetensors" else path
        if (folder / "adapter_config.json").is_file():
            self.append_log(f"loading adapter {folder}")
            self.chat.load_adapter(folder)
        else:
            self._on_error(f"{path} is not a PEFT adapter (no adapter_config.json beside it); drop an adapter "
                           "folder or its adapter_model.safetensors — corpus files go in the Corpus dialog", "")

    # ---- messages -----------------------------------------------------------------------------------------
    def append_log(self, text: str) -> None:
        self.log.appendPlainText(text)

    def _on_notice(self, text: str) -> None:
        """Something left out on the way (an adapter that does not fit, an unreadable file): said, never fatal."""
        self.append_log(f"note: {text}")
        self.statusBar().showMessage(text, 15000)

    def _on_error(self, message: str, detail: str) -> None:
        self.append_log(f"error: {message}" + (f"\n{detail}" if detail else ""))
        self.statusBar().showMessage(message, 15000)
        if self.isVisible():
            box = QMessageBox(QMessageBox.Warning, "LoRA-Lab", message, QMessageBox.Ok, self)
            box.setObjectName("error-box")
            box.open()      # not exec(): a modal loop here would block whatever reported the error

    def _show_dialog(self, kind: str, dialog) -> None:
        old = self.dialogs.get(kind)
        if old is not None:
            old.close()
        self.dialogs[kind] = dialog
        dialog.show()

    # ---- settings -----------------------------------------------------------------------------------------
    def _restore_settings(self) -> None:
        geometry = QSettings().value("window/geometry")
        if isinstance(geometry, QByteArray) and not geometry.isEmpty():
            self.restoreGeometry(geometry)
        else:
            self.resize(1280, 820)
        saved = QSettings().value("chat/generation")
        if saved:
            try:
                settings = settings_from_dict(json.loads(saved))
            except ValueError:
                settings = None
            if settings is not None:
                self.chat_panel.generation.set_settings(settings)
                self.chat.settings = settings

    def _restore_session(self) -> None:
        """The runs trained before and the last chat (restored once its model is loaded), from the data folder."""
        self.runs, notes = read_runs()
        self.runs_list.show_runs(self.runs)
        self._saved_chat, chat_notes = load_chat()
        for note in notes + chat_notes:
            self.append_log(f"note: {note}")

    def _save_chat(self) -> None:
        # Not before the last chat is back (or given up): an empty chat would replace it.
        if not self.chat.engine.loaded or self._saved_chat is not None or self.chat.pending_chat is not None:
            return
        try:
            save_chat(self.chat.chat_state())
        except OSError as exc:
            self.append_log(f"note: the chat could not be kept for the next session: {exc}")

    def closeEvent(self, event) -> None:
        QSettings().setValue("window/geometry", self.saveGeometry())
        self._save_chat()
        self.chat.stop()
        self.training.stop()
        super().closeEvent(event)


def write_job(request, folder: str):
    """engine.train.job.export_job for a wizard's RunRequest; runs in a child process (it reads the corpus)."""
    from engine.train.job import export_job
    from engine.train.runs import RunInputs

    inputs = RunInputs(model=request.model, data=request.files, val_split=request.val_split,
                       mask_prompt=request.mask_prompt, packing=request.packing, backend=request.backend)
    return export_job(request.config, inputs, folder)


def evaluate_pair(model_dir: str, files: list[str], adapter: str | None, seq_len: int, backend: str):
    """(base, adapter or None) perplexities; runs in a child process (see app.training_process.run_in_child)."""
    from engine.train.evaluate import evaluate

    base = evaluate(model_dir, files, None, seq_len, backend=backend)
    return base, (evaluate(model_dir, files, adapter, seq_len, backend=backend) if adapter else None)


# What a wrong model reference raises: said in one sentence, without a traceback.
EXPECTED_LOAD_ERRORS = {"ValueError", "FileNotFoundError", "NotADirectoryError", "PermissionError", "OSError",
                        "UnsupportedModelError", "KeyError", "JSONDecodeError", "UserError"}


def _resolve_and_read(ref: str):
    folder = resolve_model(ref)
    return folder, load_model_spec(folder)
