"""The default plan of a run, from the corpus and the model: the one place the wizard and `lora-lab train` read.

What the peers do for small data, and why the numbers below follow them:
- Unsloth's notebooks and LoRA hyperparameter guide: lr 2e-4, rank 16, an effective batch of 8 (2 x 4 accumulation),
  `max_steps=60` for a quick run, 1-3 epochs for a real dataset.
- LLaMA-Factory's LoRA SFT examples (llama3_lora_sft.yaml): lr 1e-4, 3 epochs, cosine, warmup 10 %.
- mlx-lm's LoRA: batch 4, 1000 iterations whatever the data size (a 100-example set is seen ~40 times).
A few dozen examples that teach a fact need what all three give a small set: many passes (each example seen 10-30
times), not the 1-3 epochs meant for thousands of examples. So small corpora get enough epochs to reach
MIN_STEPS optimizer steps, capped at MAX_EPOCHS; large ones keep 1-3 epochs.

`training_advice` reads a finished run's losses and says what to change when it under-fitted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from engine.backends.base import IGNORE_LABEL
from engine.corpus.sequences import validation_count
from engine.lora.config import LoraConfig
from engine.train.config import TrainConfig

MIN_STEPS = 100            # optimizer steps a small corpus is trained for (Unsloth's quick run: 60 of 8 sequences)
MAX_EPOCHS = 30            # more passes than this only memorise the wording
SMALL_MODEL_PARAMS = 1e9   # below this a LoRA takes a larger step: bench/teach_fact.py on the 135M demo, 104 steps,
                           # ends at training loss 0.004 with 5e-4 and 0.010 with 2e-4 (both 3/3 facts)
LR = 2e-4                  # Unsloth's default for LoRA/QLoRA SFT
SMALL_MODEL_LR = 5e-4
WARMUP_FRACTION = 0.05
EVALS = 4                  # validation passes a run makes (and one at the end)
UNDERFIT_LOSS = 0.5        # mean training loss (nats/token) at the end above which the data is not yet reproduced:
                           # bench/teach_fact.py answered 0/3 ending at 0.74 (24 steps), 3/3 ending at 0.01
# Preference corpora (DPO/ORPO). β 0.1 and λ 0.1 are TRL's defaults (DPOConfig.beta, ORPOConfig.beta) and
# LLaMA-Factory's pref_beta. The peers' LoRA DPO learning rates run from 5e-6 (LLaMA-Factory's llama3_lora_dpo
# example, the Zephyr QLoRA recipe, Unsloth's DPO notebook) to 5e-5: models of 1B and more get the bottom of
# that range; smaller ones the top, as SFT gives small models the larger step (SMALL_MODEL_LR). That second
# choice is ours, not measured: a preference run starts from a model that already answers, and a step too large
# for DPO shows as a margin that grows while the chosen log-probabilities fall.
PREFERENCE_BETA = 0.1
PREFERENCE_LAMBDA = 0.1
PREFERENCE_LR = 5e-6
SMALL_MODEL_PREFERENCE_LR = 5e-5


@dataclass(frozen=True)
class CorpusSummary:
    files: tuple[str, ...]
    sequences: int               # every training example, before the validation split the plan makes
    trainable_tokens: int
    longest: int                 # longest training sequence, tokens
    seq_len: int                 # the sequence length the corpus was read with
    val_fraction: float = 0.0    # the validation fraction the user read it with (corpus dialog); 0: none chosen
    pairs: int = 0               # preference pairs (DPO/ORPO), before the split; 0: a supervised corpus, whose
                                 # `sequences` are examples (for pairs they are rows, two per pair)

    def examples(self, config: TrainConfig) -> int:
        """What `total_steps` counts for this run: pairs under a preference objective, else sequences."""
        return self.sequences if config.objective == "sft" else self.pairs


def summarize_corpus(corpus) -> CorpusSummary:
    """The plan's view of a read corpus (engine.corpus.Corpus, or a PreferenceCorpus). Examples the reader held
    out for validation by a fraction count as training examples: the plan makes its own split (`total_steps`),
    as the run will."""
    held_by_fraction = corpus.val if corpus.config.val_fraction > 0 else []
    files = tuple(f.path for f in corpus.stats.files if f.split == "train" and f.refused is None)
    if is_preference_corpus(corpus):
        pairs = list(corpus.train) + list(held_by_fraction)
        rows = [labels for p in pairs for labels in (p.chosen_labels, p.rejected_labels)]
        return CorpusSummary(files, len(rows), sum(int((labels != IGNORE_LABEL).sum()) for labels in rows),
                             max((len(labels) for labels in rows), default=0), corpus.config.seq_len,
                             corpus.config.val_fraction, pairs=len(pairs))
    sequences = list(corpus.train) + list(held_by_fraction)
    return CorpusSummary(files, len(sequences), sum(s.trainable_tokens for s in sequences),
                         max((len(s) for s in sequences), default=0), corpus.config.seq_len,
                         corpus.config.val_fraction)


def is_preference_corpus(corpus) -> bool:
    """Whether a read corpus holds preference pairs (engine.corpus.preferences.PreferenceCorpus)."""
    from engine.corpus.preferences import PreferenceCorpus

    return isinstance(corpus, PreferenceCorpus)


def train_count(sequences: int, val_split: float) -> int:
    """Training sequences left once `val_split` is held out, exactly as engine.corpus.load_corpus splits."""
    return max(1, sequences - validation_count(sequences, val_split))


def recommend(summary: CorpusSummary, spec, has_hardware_gpu: bool) -> tuple[TrainConfig, float]:
    """(TrainConfig, validation fraction) suited to this much data, this model and this hardware."""
    seq_len = 32
    while seq_len < summary.longest and seq_len < 1024:
        seq_len *= 2
    seq_len = min(seq_len, spec.max_positions)
    if summary.pairs:
        return _recommend_pairs(summary, spec, has_hardware_gpu, seq_len)
    n = max(summary.sequences, 1)
    # The user's own split stands. Else: under 50 examples every one is needed to teach, and a held-out 10 % of
    # them would say little anyway.
    val_split = summary.val_fraction if summary.val_fraction > 0 else 0.1 if n >= 50 else 0.0
    train_n = train_count(n, val_split)
    batch = max(1, min(8 if has_hardware_gpu else 4, train_n))
    per_epoch = math.ceil(train_n / batch)
    # Large corpora: one pass is enough (more only overfits). Small ones: enough passes for MIN_STEPS steps.
    epochs = 3 if train_n < 200 else 2 if train_n < 2000 else 1
    epochs = max(epochs, min(MAX_EPOCHS, math.ceil(MIN_STEPS / per_epoch)))
    steps = epochs * per_epoch
    lr = SMALL_MODEL_LR if spec.parameter_count() < SMALL_MODEL_PARAMS else LR
    # No dropout by default, as in PEFT; both backends train with it if the Method page sets it.
    lora = LoraConfig(rank=16, alpha=32.0, dropout=0.0)
    config = TrainConfig(lora=lora, batch_size=batch, seq_len=seq_len, epochs=epochs, lr=lr, schedule="cosine")
    return paced(config, steps), val_split


def _recommend_pairs(summary: CorpusSummary, spec, has_hardware_gpu: bool, seq_len: int
                     ) -> tuple[TrainConfig, float]:
    """DPO on a preference corpus: the same pacing as SFT counted in pairs (a micro-batch holds whole pairs, two
    rows each), β and the learning rate from the peers (see PREFERENCE_LR)."""
    n = max(summary.pairs, 1)
    val_split = summary.val_fraction if summary.val_fraction > 0 else 0.1 if n >= 50 else 0.0
    train_n = train_count(n, val_split)
    pairs = max(1, min(4 if has_hardware_gpu else 2, train_n))
    per_epoch = math.ceil(train_n / pairs)
    epochs = 3 if train_n < 200 else 2 if train_n < 2000 else 1
    epochs = max(epochs, min(MAX_EPOCHS, math.ceil(MIN_STEPS / per_epoch)))
    config = TrainConfig(lora=LoraConfig(rank=16, alpha=32.0, dropout=0.0), batch_size=2 * pairs, seq_len=seq_len,
                         epochs=epochs, lr=preference_lr(spec), schedule="cosine", objective="dpo",
                         beta=PREFERENCE_BETA, orpo_lambda=PREFERENCE_LAMBDA)
    return paced(config, epochs * per_epoch), val_split


def preference_lr(spec) -> float:
    """The default learning rate of a DPO or ORPO run on this model (PREFERENCE_LR says why)."""
    return SMALL_MODEL_PREFERENCE_LR if spec.parameter_count() < SMALL_MODEL_PARAMS else PREFERENCE_LR


def paced(config: TrainConfig, steps: int) -> TrainConfig:
    """`config` with warmup (5 % of the steps, as LLaMA-Factory's 0.05-0.1 ratio) and evaluations (4 a run)
    for a run of `steps` steps."""
    return replace(config, warmup_steps=max(0, round(WARMUP_FRACTION * steps)), eval_every=max(1, steps // EVALS))


def total_steps(config: TrainConfig, sequences: int, val_split: float) -> int:
    """Optimizer steps the run will make (engine.train.trainer.run_steps on the same split). `sequences`: the
    examples, or for a preference objective the pairs (CorpusSummary.examples gives the right one)."""
    per_batch = config.batch_size if config.objective == "sft" else config.batch_size // 2
    per_epoch = math.ceil(math.ceil(train_count(sequences, val_split) / per_batch) / config.grad_accum)
    return config.max_steps or config.epochs * per_epoch


def training_advice(losses: list[float], config: TrainConfig, stopped: bool = False) -> list[str]:
    """What to change when a finished run shows under-fitting: the training loss still high at the end, or still
    falling. Empty when the run looks trained (or was stopped early, where the advice is simply to finish it)."""
    if stopped or len(losses) < 8 or config.objective != "sft":
        # UNDERFIT_LOSS is a cross-entropy in nats per token; a DPO/ORPO loss is not (DPO starts at ln 2 whatever
        # the data): those runs are judged by their validation reward accuracy, which the console shows.
        return []
    tail = max(2, len(losses) // 10)
    end = sum(losses[-tail:]) / tail
    before = sum(losses[-3 * tail:-tail]) / (2 * tail)
    falling = before - end > 0.1 * before
    if end <= UNDERFIT_LOSS and not falling:
        return []
    what = f"the training loss ended at {end:.2f}" + (f", still falling (from {before:.2f})" if falling else "")
    epochs = min(config.epochs * 2, max(config.epochs + 1, MAX_EPOCHS))
    lr = min(config.lr * 2, 1e-3)
    advice = [f"under-trained: {what}; the adapter may not reproduce what the data says"]
    if config.max_steps:
        advice.append(f"train longer: steps {config.max_steps} -> {config.max_steps * 2}")
    else:
        advice.append(f"train longer: epochs {config.epochs} -> {epochs}")
    if lr > config.lr:
        advice.append(f"or raise the learning rate: {config.lr:g} -> {lr:g}")
    return advice


def has_hardware_gpu(hardware) -> bool:
    """Whether `auto` may train on a GPU (engine.backends.hardware.HardwareReport): a hardware adapter that is
    not OpenGL (wgpu cannot run compute shaders there)."""
    return hardware is not None and any(not a.software and a.backend != "OpenGL" for a in hardware.adapters)


def default_plan(files, model_dir, spec, for_gpu: bool) -> tuple[TrainConfig, float, CorpusSummary]:
    """Read `files` with the model's tokenizer and recommend a plan for them: what `lora-lab train` uses when a
    setting is not given, as the wizard does from the corpus dialog's reading."""
    from engine.corpus import CorpusConfig, load_corpus, load_tokenizer
    from engine.corpus.preferences import holds_pairs, load_preferences

    # The longest context the plan would pick, so that `longest` sees every example whole.
    config = CorpusConfig(seq_len=min(1024, spec.max_positions))
    # Files of preference pairs are planned as pairs (a DPO plan), as the corpus dialog reads them.
    read = load_preferences if holds_pairs(files, config) else load_corpus
    corpus = read(list(files), load_tokenizer(model_dir), config)
    summary = summarize_corpus(corpus)
    config, val_split = recommend(summary, spec, for_gpu)
    return config, val_split, summary


def describe_plan(config: TrainConfig, summary: CorpusSummary, val_split: float) -> str:
    """One line: what the data gave and what the run will do."""
    what = f"{summary.pairs} preference pairs" if summary.pairs else f"{summary.sequences} examples"
    return (f"plan from the data: {what} (longest {summary.longest} tokens) -> "
            f"{config.epochs} epochs of batch {config.batch_size} x {config.seq_len} tokens, "
            f"{total_steps(config, summary.examples(config), val_split)} steps, lr {config.lr:g}, "
            f"validation {val_split:g}")
