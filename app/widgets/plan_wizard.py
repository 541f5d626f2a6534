"""The plan wizard: model → corpus → method → schedule → review. Finish hands a RunRequest to the window.

Defaults come from app.plan.recommend (corpus size, hardware); the review page shows app.plan.review.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from PySide6.QtCore import QSettings, Signal
from PySide6.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFileDialog, QFormLayout, QHBoxLayout, QLabel,
                               QLineEdit, QPushButton, QSpinBox, QWizard, QWizardPage)

from app.plan import CorpusSummary, adaptive_description, adaptive_settings, recommend, review, total_steps
from app.training_controller import RunRequest
from engine.backends.base import OPTIMIZERS, OptimizerConfig
from engine.lora.adalora import AdaLoraSettings
from engine.lora.config import LoraConfig, fit_targets
from engine.train.schedule import SCHEDULES
from engine.train.config import TrainConfig
from engine.backends.measured import latest_for
from engine.model.references import data_dir
from engine.train.recommend import has_hardware_gpu


def _gib(n) -> str:
    return "unknown" if n is None else f"{n / 2**30:.2f} GiB"


def default_out_dir(model_name: str) -> Path:
    root = data_dir() / "adapters"      # the one data folder (engine.model.references.data_dir)
    return root / f"{model_name}-lora-{time.strftime('%Y%m%d-%H%M%S')}"


class PlanWizard(QWizard):
    run_requested = Signal(object)     # RunRequest
    job_requested = Signal(object, object)   # RunRequest, job folder: the same run as an accelerate + PEFT job

    def __init__(self, model_ref: str, model_dir: Path, spec, summary: CorpusSummary, hardware, benchmarks,
                 parent=None):
        super().__init__(parent, objectName="plan-wizard")
        self.setWindowTitle("Plan a training run")
        self.resize(760, 560)
        self.model_ref, self.model_dir, self.spec, self.summary = model_ref, model_dir, spec, summary
        self.hardware, self.benchmarks = hardware, list(benchmarks)
        # Backend speeds an earlier run measured on this machine for this model: the ETA without a benchmark.
        self.speeds = latest_for(spec)
        has_gpu = has_hardware_gpu(hardware)
        config, val_split = recommend(summary, spec, has_gpu)
        self._build_pages(config, val_split)
        self.setButtonText(QWizard.FinishButton, "Start training")
        self.currentIdChanged.connect(lambda _: self._refresh_review())
        self.backend.currentIndexChanged.connect(lambda _: self._refresh_review())

    # -- pages ----------------------------------------------------------------------------------------------
    def _page(self, title: str, subtitle: str) -> tuple[QWizardPage, QFormLayout]:
        page = QWizardPage()
        page.setTitle(title)
        page.setSubTitle(subtitle)
        form = QFormLayout(page)
        self.addPage(page)
        return page, form

    def _build_pages(self, c: TrainConfig, val_split: float) -> None:
        self._build_model_page()
        self._build_corpus_page(val_split)
        self._build_method_page(c)
        self._build_schedule_page(c)
        self._build_review_page()

    def _build_model_page(self) -> None:
        s = self.spec
        _, form = self._page("Model", "The base model the adapter is trained for.")
        form.addRow("Model:", QLabel(self.model_ref, objectName="plan-model"))
        form.addRow("Architecture:", QLabel(f"{s.model_type}, {s.layers} layers, hidden {s.hidden}, "
                                            f"{s.parameter_count() / 1e6:.1f} M parameters"))
        form.addRow("Context:", QLabel(f"{s.max_positions} tokens"))

    def _build_corpus_page(self, val_split: float) -> None:
        corpus = self.summary
        _, form = self._page("Corpus", "What was read from your files (Corpus dialog).")
        form.addRow("Files:", QLabel("\n".join(Path(f).name for f in corpus.files), wordWrap=True))
        if corpus.pairs:
            form.addRow("Preference pairs:", QLabel(f"{corpus.pairs:,} ({corpus.sequences:,} rows: chosen and "
                                                    "rejected)", objectName="plan-pairs"))
        else:
            form.addRow("Training sequences:", QLabel(f"{corpus.sequences:,}", objectName="plan-sequences"))
        form.addRow("Trained tokens:", QLabel(f"{corpus.trainable_tokens:,}"))
        form.addRow("Longest sequence:", QLabel(f"{corpus.longest} tokens"))
        self.val_split = QDoubleSpinBox(minimum=0.0, maximum=0.5, singleStep=0.05, decimals=2, value=val_split,
                                        objectName="plan-val-split")
        form.addRow("Validation split:", self.val_split)

    def _build_method_page(self, c: TrainConfig) -> None:
        _, form = self._page("Method", "What the run optimises, and LoRA: which projections get an adapter and "
                                       "how large it is.")
        self._build_objective(form, c)
        self.targets = {}
        row = QHBoxLayout()
        chosen = fit_targets(self.spec, c.lora).targets     # Phi-3: its fused qkv_proj and gate_up_proj
        for t in self.spec.lora_targets:
            box = QCheckBox(t, objectName=f"plan-target-{t}", checked=t in chosen)
            self.targets[t] = box
            row.addWidget(box)
        form.addRow("Targets:", row)
        self.rank = QSpinBox(minimum=1, maximum=1024, value=c.lora.rank, objectName="plan-rank")
        self.alpha = QDoubleSpinBox(minimum=0.01, maximum=4096, value=c.lora.alpha, objectName="plan-alpha")
        self.dropout = QDoubleSpinBox(minimum=0.0, maximum=0.95, singleStep=0.05, value=c.lora.dropout,
                                      objectName="plan-dropout")
        self.rslora = QCheckBox("rank-stabilised scaling (alpha / √r)", objectName="plan-rslora",
                                checked=c.lora.use_rslora)
        form.addRow("Rank r:", self.rank)
        form.addRow("Alpha:", self.alpha)
        form.addRow("Dropout:", self.dropout)
        form.addRow("rsLoRA:", self.rslora)
        self._build_adaptive_rows(form, c)

    def _build_adaptive_rows(self, form: QFormLayout, c: TrainConfig) -> None:
        """Adaptive rank (AdaLoRA): an initial rank and a target average rank, whose total over the projections
        is the budget the run prunes toward; PEFT's defaults (init_r 12, target_r 8) unless the config has one."""
        settings = c.adaptive_rank or AdaLoraSettings()
        self.adaptive = QCheckBox("adaptive rank (AdaLoRA): prune toward a total-rank budget, moving rank to the "
                                  "projections that need it", objectName="plan-adaptive",
                                  checked=c.adaptive_rank is not None)
        self.init_rank = QSpinBox(minimum=1, maximum=1024, value=settings.init_r, objectName="plan-init-rank")
        self.target_rank = QSpinBox(minimum=1, maximum=1024, value=settings.target_r, objectName="plan-target-rank")
        self.budget = QLabel(objectName="plan-rank-budget", wordWrap=True)
        form.addRow("Adaptive rank:", self.adaptive)
        form.addRow("Initial rank:", self.init_rank)
        form.addRow("Target average rank:", self.target_rank)
        form.addRow("Budget:", self.budget)
        for signal in (self.adaptive.toggled, self.init_rank.valueChanged, self.target_rank.valueChanged,
                       *(box.toggled for box in self.targets.values())):
            signal.connect(self._show_budget)
        self._show_budget()

    def _show_budget(self, *_) -> None:
        adaptive = self.adaptive.isChecked()
        self.rank.setEnabled(not adaptive)    # the adapter is trained at the initial rank
        for w in (self.init_rank, self.target_rank, self.budget):
            w.setEnabled(adaptive)
        projections = self.spec.layers * sum(box.isChecked() for box in self.targets.values())
        self.budget.setText(f"total rank {self.target_rank.value() * projections:,} over {projections} projections "
                            f"(from {self.init_rank.value() * projections:,} at the start)" if adaptive
                            else "off: every projection keeps rank r")

    def _build_objective(self, form: QFormLayout, c: TrainConfig) -> None:
        """SFT for a supervised corpus; DPO (the default) or ORPO for a corpus of preference pairs. The other
        kind stays listed, disabled, with the reason in its tooltip: the corpus decides what can be trained."""
        pairs = bool(self.summary.pairs)
        self.objective = QComboBox(objectName="plan-objective")
        for name, text, usable, why in (
                ("sft", "SFT (supervised: learn to say the answers)", not pairs,
                 "needs supervised examples; this corpus holds preference pairs"),
                ("dpo", "DPO (prefer the chosen answer over the rejected one)", pairs,
                 "needs a corpus of preference pairs (records with 'chosen' and 'rejected')"),
                ("orpo", "ORPO (SFT on the chosen answer plus an odds-ratio preference term)", pairs,
                 "needs a corpus of preference pairs (records with 'chosen' and 'rejected')")):
            self.objective.addItem(text, name)
            item = self.objective.model().item(self.objective.count() - 1)
            item.setEnabled(usable)
            if not usable:
                item.setToolTip(why)
        self.objective.setCurrentIndex(self.objective.findData(c.objective))
        self.beta = QDoubleSpinBox(minimum=0.001, maximum=100.0, decimals=3, singleStep=0.05, value=c.beta,
                                   objectName="plan-beta")
        self.beta.setToolTip("DPO β: how far the adapter may move from the base model (TRL's default 0.1)")
        self.label_smoothing = QDoubleSpinBox(minimum=0.0, maximum=0.49, decimals=2, singleStep=0.05,
                                              value=c.label_smoothing, objectName="plan-label-smoothing")
        self.label_smoothing.setToolTip("DPO label smoothing ε: the share of pairs assumed to be mislabelled; "
                                        "0 = plain DPO")
        self.orpo_lambda = QDoubleSpinBox(minimum=0.001, maximum=100.0, decimals=3, singleStep=0.05,
                                          value=c.orpo_lambda, objectName="plan-orpo-lambda")
        self.orpo_lambda.setToolTip("ORPO λ: the weight of the odds-ratio term beside the SFT loss (TRL's 0.1)")
        form.addRow("Objective:", self.objective)
        form.addRow("DPO β:", self.beta)
        form.addRow("Label smoothing:", self.label_smoothing)
        form.addRow("ORPO λ:", self.orpo_lambda)
        self._objective_form = form
        self.objective.currentIndexChanged.connect(lambda _: self._show_objective_settings())
        self._show_objective_settings()

    def _show_objective_settings(self) -> None:
        name = self.objective.currentData()
        for widget, shown in ((self.beta, name == "dpo"), (self.label_smoothing, name == "dpo"),
                              (self.orpo_lambda, name == "orpo")):
            self._objective_form.setRowVisible(widget, shown)

    def _build_schedule_page(self, c: TrainConfig) -> None:
        _, form = self._page("Schedule", "How long and how fast to train.")
        self.epochs = QSpinBox(minimum=1, maximum=1000, value=c.epochs, objectName="plan-epochs")
        self.max_steps = QSpinBox(minimum=0, maximum=10**7, value=c.max_steps, objectName="plan-max-steps",
                                  specialValueText="as the epochs take")
        self.lr = QDoubleSpinBox(minimum=1e-6, maximum=1.0, decimals=6, singleStep=1e-4, value=c.lr,
                                 objectName="plan-lr")
        self.schedule = QComboBox(objectName="plan-schedule")
        self.schedule.addItems(list(SCHEDULES))
        self.schedule.setCurrentText(c.schedule)
        self.warmup = QSpinBox(minimum=0, maximum=10**6, value=c.warmup_steps, objectName="plan-warmup")
        self.batch = QSpinBox(minimum=1, maximum=1024, value=c.batch_size, objectName="plan-batch")
        if self.summary.pairs:      # rows, two per pair: a micro-batch holds whole pairs
            self.batch.setRange(2, 1024)
            self.batch.setSingleStep(2)
            self.batch.setToolTip("rows per micro-batch: each pair is two rows (chosen and rejected)")
        self.accum = QSpinBox(minimum=1, maximum=1024, value=c.grad_accum, objectName="plan-accum")
        self.seq_len = QSpinBox(minimum=16, maximum=self.spec.max_positions, value=c.seq_len,
                                objectName="plan-seq-len")
        self.optimizer = QComboBox(objectName="plan-optimizer")
        self.optimizer.addItems(list(OPTIMIZERS))
        self.optimizer.setCurrentText(c.optim.name)
        self.backend = self._backend_choice()
        self._eval_every = c.eval_every
        for label, w in (("Epochs:", self.epochs), ("Or steps:", self.max_steps), ("Learning rate:", self.lr),
                         ("Schedule:", self.schedule), ("Warmup steps:", self.warmup), ("Batch size:", self.batch),
                         ("Gradient accumulation:", self.accum), ("Sequence length:", self.seq_len),
                         ("Optimizer:", self.optimizer), ("Backend:", self.backend)):
            form.addRow(label, w)

    def _backend_choice(self) -> QComboBox:
        """auto, the CPU, or one wgpu adapter by name (not OpenGL ones); starts on the last requested run's choice."""
        backend = QComboBox(objectName="plan-backend")
        backend.addItem("auto (fastest measured)", "auto")
        backend.addItem("CPU (onnxruntime)", "cpu")
        for a in (self.hardware.adapters if self.hardware else ()):
            if a.backend != "OpenGL":
                backend.addItem(f"{a.name} ({a.backend})" + (" — software" if a.software else ""),
                                f"wgpu:{a.name}")
        chosen = backend.findData(QSettings().value("train/backend", "auto"))
        backend.setCurrentIndex(max(0, chosen))
        return backend

    def _build_review_page(self) -> None:
        page, _ = self._page("Review", "What the run needs against what this machine has.")
        layout = page.layout()
        self.review_label = QLabel(objectName="plan-review", wordWrap=True)
        self.warnings = QLabel(objectName="plan-warnings", wordWrap=True)
        self.out_dir = QLineEdit(str(default_out_dir(Path(self.model_dir).name)), objectName="plan-out-dir")
        layout.addRow(self.review_label)
        layout.addRow("Adapter folder:", self.out_dir)
        layout.addRow(self.warnings)
        self.error = QLabel(objectName="plan-error", wordWrap=True)
        layout.addRow(self.error)
        self.elsewhere = elsewhere = QPushButton("Run elsewhere…", objectName="plan-run-elsewhere")
        elsewhere.clicked.connect(self._ask_job_folder)
        layout.addRow(elsewhere)

    # -- results -----------------------------------------------------------------------------------------------
    def config(self) -> TrainConfig:
        """The TrainConfig the pages describe; ValueError (with the engine's message) if it is invalid."""
        adaptive = self.adaptive.isChecked()
        rank = self.init_rank.value() if adaptive else self.rank.value()
        lora = LoraConfig(rank=rank, alpha=self.alpha.value(), dropout=self.dropout.value(),
                          targets=tuple(t for t, box in self.targets.items() if box.isChecked()),
                          use_rslora=self.rslora.isChecked())
        config = TrainConfig(lora=lora, optim=OptimizerConfig(name=self.optimizer.currentText()),
                             batch_size=self.batch.value(), grad_accum=self.accum.value(),
                             seq_len=self.seq_len.value(), epochs=self.epochs.value(),
                             max_steps=self.max_steps.value(), lr=self.lr.value(),
                             schedule=self.schedule.currentText(), warmup_steps=self.warmup.value(),
                             eval_every=self._eval_every, weights="auto", recompute=None,
                             objective=self.objective.currentData(), beta=self.beta.value(),
                             label_smoothing=self.label_smoothing.value(), orpo_lambda=self.orpo_lambda.value())
        if not adaptive:
            return config
        # The budget phases are fractions of the run (app.plan.adaptive_settings), so they need its length.
        steps = total_steps(config, self.summary.examples(config), self.val_split.value())
        return dataclasses.replace(config, adaptive_rank=adaptive_settings(self.init_rank.value(),
                                                                           self.target_rank.value(), steps))

    def _refresh_review(self) -> None:
        if self.currentPage() is not self.page(self.pageIds()[-1]):
            return
        try:
            config = self.config()
        except ValueError as exc:
            self.error.setText(f"<b>Cannot train with these settings:</b> {exc}")
            self.review_label.setText("")
            return
        self.error.setText("")
        # The exported job is a supervised training loop (engine.train.job): DPO/ORPO train here only.
        self.elsewhere.setEnabled(config.objective == "sft")
        self.elsewhere.setToolTip(
            "Write this run as a job folder for PyTorch + PEFT on accelerate (one GPU, several, a cluster): the same "
            "tokens and settings; its adapter opens here" if config.objective == "sft" else
            f"the job folder trains supervised runs only; {config.objective.upper()} trains here")
        r = review(config, self.spec, self.summary, self.val_split.value(), self.hardware, self.benchmarks,
                   self.backend.currentData(), self.speeds)
        available = (f"GPU memory {_gib(r.device_bytes)}" if r.device_bytes is not None
                     else f"GPU memory unknown; RAM available {_gib(r.ram_available)}")
        memory = (f"Memory: the <b>CPU backend</b> (onnxruntime, f32) trains this run; it uses what it needs from "
                  f"RAM (the console shows it); RAM available {_gib(r.ram_available)}.<br>" if r.runs_on == "cpu"
                  else f"Memory (WGSL engine plan): <b>{_gib(r.engine_bytes)}</b> needed; {available}.<br>"
                  + ("".join(f"{line}<br>" for line in r.plan.lines()) if r.plan is not None else ""))
        eta = f"about {r.eta_s / 60:.1f} min" if r.eta_s is not None and r.eta_s >= 60 else \
            f"about {r.eta_s:.0f} s" if r.eta_s is not None else "unknown"
        objective = {"sft": "", "dpo": f"DPO (β {config.beta:g}; the reference is the base model, adapter off), ",
                     "orpo": f"ORPO (λ {config.orpo_lambda:g}), "}[config.objective]
        pairs = f" ({config.batch_size // 2} pairs)" if config.objective != "sft" else ""
        self.review_label.setText(
            f"<b>{r.steps:,} steps</b> of {config.batch_size}{pairs} × {config.grad_accum} × {config.seq_len} "
            f"tokens, {objective}LoRA r={config.lora.rank} on {', '.join(config.lora.targets)}.<br>"
            + (adaptive_description(config.adaptive_rank, self.spec.layers * len(config.lora.targets)) + "<br>"
               if config.adaptive_rank is not None else "")
            + memory + f"ETA: <b>{eta}</b> ({r.eta_basis}).")
        self.warnings.setText("".join(f"⚠ {w}<br>" for w in r.warnings) or "No warnings.")

    def validateCurrentPage(self) -> bool:   # noqa: N802
        if self.currentPage() is self.page(self.pageIds()[-1]):
            try:
                request = self.request()
            except ValueError as exc:
                self.error.setText(f"<b>Cannot train with these settings:</b> {exc}")
                return False
            self.run_requested.emit(request)
        return super().validateCurrentPage()

    def _ask_job_folder(self) -> None:
        try:
            request = self.request()
        except ValueError as exc:
            self.error.setText(f"<b>Cannot write a job with these settings:</b> {exc}")
            return
        parent = QFileDialog.getExistingDirectory(self, "Where to write the job folder")
        if parent:
            self.job_requested.emit(request, Path(parent) / f"{request.out_dir.name}-job")

    def request(self) -> RunRequest:
        out = self.out_dir.text().strip()
        if not out:
            raise ValueError("choose a folder for the adapter")
        QSettings().setValue("train/backend", self.backend.currentData())   # Evaluate uses the same backend
        return RunRequest(model=self.model_ref, files=self.summary.files, val_split=self.val_split.value(),
                          config=self.config(), out_dir=Path(out), backend=self.backend.currentData())
