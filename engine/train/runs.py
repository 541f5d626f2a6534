"""From what a user chose (model, data files, settings) to a ready Trainer — shared by the CLI and the GUI.

`prepare_run` resolves the model, reads the corpus with the model's tokenizer, imports an initial adapter or a
checkpoint to resume, and picks the backend; everything it refuses, it refuses before a backend is built.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from engine.backends.base import MemoryOptions
from engine.model.references import resolve_for_adapter
from engine.train.config import TrainConfig
from engine.train.lock import RunLock
from engine.train.reference import describe_reference
from engine.train.trainer import BackendFactory, Trainer, TrainerCallback

@dataclass(frozen=True)
class RunInputs:
    model: str = field(metadata={"help": "model folder, .gguf file, hub id or 'demo'"})
    data: tuple[str, ...] = field(metadata={"help": "training files"})
    val_data: tuple[str, ...] = field(default=(), metadata={"help": "validation-only files"})
    val_split: float = field(default=0.0, metadata={"help": "fraction of the data held out for validation"})
    mask_prompt: bool | None = field(default=None, metadata={"help": "None: per-format default; False: all"})
    packing: bool = field(default=False, metadata={"help": "pack examples into full sequences"})
    init_adapter: str | None = field(default=None, metadata={"help": "PEFT adapter to continue training"})
    backend: str = field(default="auto", metadata={"help": "auto | cpu | wgpu | wgpu:<adapter name>"})
    gpu_memory: int | None = field(default=None, metadata={
        "help": "bytes of GPU memory the run is planned for; None: read from the driver where it can be"})

    def __post_init__(self):
        if not self.data:
            raise ValueError("no training data: pass at least one --data file")
        from engine.backends.choose import parse_backend_kind
        parse_backend_kind(self.backend)
        if self.val_data and self.val_split:
            raise ValueError("choose either --val-split or --val-data, not both")
        object.__setattr__(self, "data", tuple(str(d) for d in self.data))
        object.__setattr__(self, "val_data", tuple(str(d) for d in self.val_data))

    def to_dict(self) -> dict:
        out = asdict(self)
        out["data"], out["val_data"] = list(self.data), list(self.val_data)
        return out


def plan_memory(config: TrainConfig, spec, model_dir: Path, inputs: RunInputs,
                log: Callable[[str], None] = lambda _m: None) -> TrainConfig:
    """`config` with its "auto" weight format and recompute decided, and the micro-batch fitted to the GPU's
    memory where that is known (engine.train.memory_fit); the plan is logged. The CPU backend computes in f32
    with onnxruntime's own memory, so there the settings only resolve to f32 and no recompute."""
    from engine.backends.choose import parse_backend_kind
    from engine.backends.hardware import gpu_memory_bytes
    from engine.model.weights import open_weights
    from engine.train.memory_fit import fit_plan, usable_budget, with_plan

    if parse_backend_kind(inputs.backend)[0] == "cpu":
        return replace(config, weights="f32" if config.weights == "auto" else config.weights,
                       recompute=bool(config.recompute))
    budget = usable_budget(inputs.gpu_memory or gpu_memory_bytes())
    if budget is None and config.weights != "auto" and config.recompute is not None:
        return config
    stored = {name: t.format for name, t in open_weights(model_dir).stored().items()}
    plan = fit_plan(spec, config.lora, config.optim, config.batch_size, config.seq_len, budget,
                    weights=config.weights, recompute=config.recompute, stored=stored, grad_accum=config.grad_accum)
    for line in plan.lines():
        log(line)
    return with_plan(config, plan)


def backend_factory(kind: str, model_dir: Path, on_choice: Callable[[object], None] = lambda _choice: None,
                    threads: int | None = None) -> BackendFactory:
    """A factory the trainer calls with (lora, optim, batch_size, seq_len, seed=, init_state=, memory=): the
    backend `kind` names (auto | cpu | wgpu | wgpu:<adapter>); for auto, `on_choice` gets the measured BackendChoice.
    `threads` caps the CPU backend's threads (None: every usable core)."""
    from engine.backends.choose import create_backend, parse_backend_kind

    parse_backend_kind(kind)          # refuse a bad name before any model is read

    def factory(lora, optim, batch_size, seq_len, seed=0, init_state=None, memory=MemoryOptions()):
        backend, choice = create_backend(kind, model_dir, lora, optim, batch_size, seq_len, seed=seed,
                                         init_state=init_state, threads=threads, memory=memory)
        if choice is not None:
            on_choice(choice)
        return backend
    return factory


@dataclass
class PreparedRun:
    trainer: Trainer
    corpus_stats: object          # engine.corpus.CorpusStats
    model_dir: Path
    base_model: str


def prepare_run(config: TrainConfig, inputs: RunInputs, out_dir: str | Path,
                callback: TrainerCallback | None = None, resume: str | Path | None = None,
                factory: BackendFactory | None = None, log: Callable[[str], None] = lambda _m: None,
                corpus_progress: Callable[[int, int], None] | None = None,
                corpus_cancel: Callable[[], bool] | None = None) -> PreparedRun:
    """Everything up to the first step. With `resume`, the run's settings come from the checkpoint.

    Takes the output folder's RunLock first (a second run into `out_dir` is refused at once, naming the first's
    process); the returned Trainer holds it until its run() ends."""
    # Refuse a second run into this folder before any slow work; the Trainer holds the lock from here on.
    lock = RunLock(out_dir).acquire()
    try:
        return _prepare(config, inputs, out_dir, callback, resume, factory, log, corpus_progress, corpus_cancel, lock)
    except BaseException:
        lock.abandon()
        raise


def _prepare(config, inputs, out_dir, callback, resume, factory, log, corpus_progress, corpus_cancel,
             lock) -> PreparedRun:
    from engine.train.checkpoint import load_checkpoint
    from engine.model.spec import load_model_spec
    from engine.model.weights import check_weights_fit, open_weights

    model_dir, base_model = resolve_for_adapter(inputs.model, log=log)
    spec = load_model_spec(model_dir)
    check_weights_fit(spec, open_weights(model_dir))   # headers only: damaged or mismatched weights stop here
    checkpoint = None
    if resume is not None:
        checkpoint = load_checkpoint(resume, spec)
        config = TrainConfig.from_dict(checkpoint.trainer_state["config"])
        saved = checkpoint.trainer_state.get("inputs") or {}
        # Same data settings as the interrupted run; the files may be named again (or moved) by the caller.
        inputs = replace(inputs, val_split=saved.get("val_split", inputs.val_split),
                         mask_prompt=saved.get("mask_prompt", inputs.mask_prompt),
                         packing=saved.get("packing", inputs.packing))
    if checkpoint is None:          # a resumed run keeps the plan it was started with
        config = plan_memory(config, spec, model_dir, inputs, log)
    data = prepare_data(config, inputs, model_dir, spec, base_model, import_init=checkpoint is None, log=log,
                        corpus_progress=corpus_progress, corpus_cancel=corpus_cancel)
    config, init_state, corpus, train, val = data.config, data.init_state, data.corpus, data.train, data.val
    unit = "sequences" if config.objective == "sft" else "pairs"
    card = {"training data": ", ".join(Path(p).name for p in inputs.data),
            f"training {unit}": len(corpus.train), f"validation {unit}": len(corpus.val)}
    def on_choice(choice):            # what `--backend auto` measured, and why it chose
        for line in choice.lines():
            log(line)

    trainer = Trainer(config, factory or backend_factory(inputs.backend, model_dir, on_choice), train, out_dir,
                      base_model=base_model, val=val, callback=callback, init_state=init_state,
                      resume=checkpoint, card=card, inputs=inputs.to_dict(), lock=lock)
    if trainer.reference_mode is not None:
        log(describe_reference(trainer.reference_mode))
    return PreparedRun(trainer, corpus.stats, model_dir, base_model)


@dataclass
class RunData:
    """What a run trains on, exactly as the desktop trainer sees it (`lora-lab export-job` writes the same)."""
    config: TrainConfig           # with an initial adapter's rank, alpha and targets
    init_state: dict | None       # the initial adapter's LoRA tensors (PEFT names), or None: a fresh init
    corpus: object                # engine.corpus.Corpus, or a PreferenceCorpus for DPO/ORPO
    train: object                 # engine.train.data.CorpusBatches, or PreferenceBatches
    val: list                     # validation batches, [B, T] each


def prepare_data(config: TrainConfig, inputs: RunInputs, model_dir: Path, spec, base_model: str,
                 import_init: bool = True, log: Callable[[str], None] = lambda _m: None,
                 corpus_progress: Callable[[int, int], None] | None = None,
                 corpus_cancel: Callable[[], bool] | None = None) -> RunData:
    """The corpus read with the model's tokenizer, batched for training and validation, and the initial adapter
    (when `import_init` and inputs name one); refuses what the model cannot take."""
    from engine.lora.config import fit_targets
    from engine.lora.peft_read import adapter_base_model, import_adapter
    from engine.corpus import CorpusConfig, load_corpus, load_tokenizer
    from engine.train.data import CorpusBatches, corpus_val_batches

    check_seq_len(spec, config.seq_len)
    # The targets as the model names them (Phi-3: qkv_proj, gate_up_proj), so checkpoints and adapters do too.
    config = replace(config, lora=fit_targets(spec, config.lora))
    init_state = None
    if inputs.init_adapter and import_init:
        lora, init_state, adapter_config = import_adapter(inputs.init_adapter, spec)
        config = replace(config, lora=lora)
        named = adapter_base_model(adapter_config)
        if named and named != base_model:
            log(f"note: the adapter names {named} as its base; training it on {base_model}")
    tokenizer = load_tokenizer(model_dir)
    if config.objective != "sft":
        return _prepare_pairs(config, inputs, spec, tokenizer, init_state)
    corpus = load_corpus(inputs.data, tokenizer, CorpusConfig(
        seq_len=config.seq_len, mask_prompt=inputs.mask_prompt, packing=inputs.packing,
        val_fraction=inputs.val_split, val_files=tuple(Path(p) for p in inputs.val_data), seed=config.seed),
        progress=corpus_progress, cancel=corpus_cancel)
    if not corpus.train:
        raise ValueError("no usable training data in " + ", ".join(inputs.data) + " (run `lora-lab corpus` to "
                         "see why each record was skipped)")
    if inputs.val_data and not corpus.val:
        raise ValueError("no usable validation data in " + ", ".join(inputs.val_data) + ": "
                         + _why_unusable([f for f in corpus.stats.files if f.split == "val"])
                         + " (run `lora-lab corpus` on it to see every reason), or drop --val-data")
    if corpus.tokenizer.vocab_size > spec.vocab_size:
        raise ValueError(f"the tokenizer has {corpus.tokenizer.vocab_size} tokens but the model only "
                         f"{spec.vocab_size} embeddings")
    pad = corpus.tokenizer.pad_id
    train = CorpusBatches(corpus.train, config.batch_size, config.seq_len, pad, shuffle=config.shuffle)
    val = corpus_val_batches(corpus.val, config.batch_size, config.seq_len, pad)
    return RunData(config, init_state, corpus, train, val)


def _why_unusable(files) -> str:
    """The first reason a file gave nothing, for a one-line message."""
    for fs in files:
        if fs.refused:
            return f"{fs.path}: {fs.refused}"
        if fs.skipped:
            return f"{fs.path} line {fs.skipped[0].line}: {fs.skipped[0].reason}"
        if not fs.records:
            return f"{fs.path} holds no text"
    return "its examples give no sequence"


def _prepare_pairs(config: TrainConfig, inputs: RunInputs, spec, tokenizer, init_state) -> RunData:
    """DPO/ORPO data: preference pairs, completion-only labels (prompt masking is what the objectives compare)."""
    from engine.corpus import CorpusConfig
    from engine.corpus.preferences import load_preferences
    from engine.train.data import PreferenceBatches, preference_val_batches

    if inputs.packing or inputs.mask_prompt is False:
        raise ValueError(f"objective {config.objective} compares two answers to one prompt: packing and training "
                         "on the prompt (--no-mask-prompt) do not apply; drop those options")
    corpus = load_preferences(inputs.data, tokenizer, CorpusConfig(
        seq_len=config.seq_len, val_fraction=inputs.val_split, val_files=tuple(Path(p) for p in inputs.val_data),
        seed=config.seed))
    if not corpus.train:
        raise ValueError("no usable preference pairs in " + ", ".join(inputs.data) + " (each record needs "
                         "'chosen' and 'rejected'; run `lora-lab corpus --pairs` to see why each was skipped)")
    if corpus.tokenizer.vocab_size > spec.vocab_size:
        raise ValueError(f"the tokenizer has {corpus.tokenizer.vocab_size} tokens but the model only "
                         f"{spec.vocab_size} embeddings")
    train = PreferenceBatches(corpus, config.batch_size, shuffle=config.shuffle)
    return RunData(config, init_state, corpus, train, preference_val_batches(corpus, config.batch_size))


def check_seq_len(spec, seq_len: int) -> None:
    """Refuse a sequence length the model cannot take: past its positions."""
    if seq_len > spec.max_positions:
        raise ValueError(f"seq-len {seq_len} exceeds the model's {spec.max_positions} positions")


def eval_stream(files, model_dir: Path, mask_prompt: bool | None = None):
    """One token stream (input_ids, labels) [N] of every example in `files`, rendered as the corpus renders
    training data (chat templates, prompt masking), in file order, for strided perplexity."""
    import numpy as np

    from engine.corpus import CorpusConfig, load_corpus, load_tokenizer

    # The largest sequence length the corpus allows, so a text file stays one stream, not cut into windows.
    corpus = load_corpus(files, load_tokenizer(model_dir), CorpusConfig(seq_len=1 << 20, mask_prompt=mask_prompt))
    if not corpus.train:
        raise ValueError("no usable text in " + ", ".join(map(str, files)) + " (run `lora-lab corpus` to see why)")
    ids = np.concatenate([s.input_ids for s in corpus.train]).astype(np.int32)
    labels = np.concatenate([s.labels for s in corpus.train]).astype(np.int32)
    return ids, labels
