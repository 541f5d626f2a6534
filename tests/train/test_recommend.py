"""The default plan (engine.train.recommend): follows the data and the model, counts the steps the run makes,
says when a run under-fitted; `lora-lab train` and `export-job` fill what is not given from it."""
from __future__ import annotations

import argparse
import json
import math

import pytest

from engine.model.spec import load_model_spec
from engine.train.config import TrainConfig
from engine.train.recommend import (MAX_EPOCHS, MIN_STEPS, CorpusSummary, default_plan, recommend, total_steps,
                                    training_advice)


def _summary(n: int, longest: int = 60, val_fraction: float = 0.0) -> CorpusSummary:
    return CorpusSummary(("f.jsonl",), n, n * 20, longest, 1024, val_fraction)


def test_a_few_dozen_examples_are_seen_ten_to_thirty_times(tiny_llama_dir):
    """The issue's case: 30 chat examples of one fact. Three epochs (24 steps) learned the shape, not the fact."""
    spec = load_model_spec(tiny_llama_dir)
    for has_gpu in (False, True):
        config, val_split = recommend(_summary(30), spec, has_gpu)
        steps = total_steps(config, 30, val_split)
        assert val_split == 0.0 and 10 <= config.epochs <= MAX_EPOCHS
        assert steps >= MIN_STEPS and config.lr > 2e-4      # a 1M-parameter model: the small-model rate
        assert config.warmup_steps == round(0.05 * steps) and config.eval_every == steps // 4


def test_large_corpora_keep_one_to_three_epochs(tiny_llama_dir):
    spec = load_model_spec(tiny_llama_dir)
    # 150 examples (135 trained, 17 batches of 8) still get MIN_STEPS; from ~1000 the peers' 1-3 epochs hold.
    assert [recommend(_summary(n), spec, True)[0].epochs for n in (150, 1000, 5000, 50_000)] == [6, 2, 1, 1]
    config, val_split = recommend(_summary(5000), spec, False)
    assert val_split == 0.1 and total_steps(config, 5000, val_split) == math.ceil(4500 / 4)


def test_the_users_validation_split_stands(tiny_llama_dir):
    spec = load_model_spec(tiny_llama_dir)
    assert recommend(_summary(30, val_fraction=0.2), spec, False)[1] == 0.2


def test_the_reviewed_steps_are_the_steps_the_run_makes(tiny_llama_dir, tmp_path):
    """The review said 21 steps and the run did 24: the plan must split and batch as the loader and trainer do."""
    from engine.corpus import CorpusConfig, load_corpus, load_tokenizer
    from engine.train.recommend import summarize_corpus
    from engine.train.runs import RunInputs, prepare_run

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"example number {i} " * (1 + i % 3)}) + "\n" for i in range(29)))
    # Read as the corpus dialog does, with its own validation fraction: the plan re-splits, as the run will.
    corpus = load_corpus([data], load_tokenizer(tiny_llama_dir), CorpusConfig(seq_len=64, val_fraction=0.15))
    summary = summarize_corpus(corpus)
    assert summary.sequences == 29
    spec = load_model_spec(tiny_llama_dir)
    config, val_split = recommend(summary, spec, has_hardware_gpu=False)
    for split in dict.fromkeys((val_split, 0.15, 0.33)):     # one run per output folder: no repeats
        prepared = prepare_run(config, RunInputs(model=str(tiny_llama_dir), data=(str(data),), val_split=split,
                                                 backend="cpu"), tmp_path / f"out{split}")
        assert prepared.trainer.total_steps == total_steps(config, summary.sequences, split)


def test_a_preference_corpus_is_planned_as_dpo_with_the_peers_defaults_and_the_run_makes_the_reviewed_steps(
        tiny_llama_dir, tmp_path):
    """Pairs count as the plan's examples (a micro-batch holds whole pairs, two rows each): β 0.1, λ 0.1 and a
    learning rate from the peers' 5e-6..5e-5, and the steps the review shows are the run's, whatever the split."""
    from dataclasses import replace

    from engine.corpus import CorpusConfig, load_tokenizer
    from engine.corpus.preferences import holds_pairs, load_preferences
    from engine.train.recommend import PREFERENCE_LR, SMALL_MODEL_PREFERENCE_LR, preference_lr, summarize_corpus
    from engine.train.runs import RunInputs, prepare_run

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": f"Yes, {i} indeed.",
                                        "rejected": f"No {i}."}) + "\n" for i in range(23)))
    text = tmp_path / "t.jsonl"
    text.write_text(json.dumps({"text": "plain"}) + "\n")
    assert holds_pairs([data]) and not holds_pairs([text]) and not holds_pairs([data, text])
    corpus = load_preferences([data], load_tokenizer(tiny_llama_dir), CorpusConfig(seq_len=64, val_fraction=0.2))
    summary = summarize_corpus(corpus)
    assert summary.pairs == 23 and summary.sequences == 46
    spec = load_model_spec(tiny_llama_dir)
    config, val_split = recommend(summary, spec, has_hardware_gpu=False)
    assert (config.objective, config.beta, config.orpo_lambda, val_split) == ("dpo", 0.1, 0.1, 0.2)
    assert config.batch_size % 2 == 0 and config.lr == SMALL_MODEL_PREFERENCE_LR == preference_lr(spec)
    assert 5e-6 <= PREFERENCE_LR <= SMALL_MODEL_PREFERENCE_LR <= 5e-5
    for split, accum in ((val_split, 1), (0.3, 2), (0.0, 3)):
        planned = replace(config, grad_accum=accum)
        prepared = prepare_run(planned, RunInputs(model=str(tiny_llama_dir), data=(str(data),), val_split=split,
                                                  backend="cpu"), tmp_path / f"out{split}-{accum}")
        assert prepared.trainer.total_steps == total_steps(planned, summary.examples(planned), split)


def test_advice_when_the_loss_is_still_high_or_falling():
    config = TrainConfig(epochs=3, lr=2e-4)
    falling = [3.0 - 0.05 * i for i in range(40)]
    advice = training_advice(falling, config)
    assert advice[0].startswith("under-trained") and "still falling" in advice[0]
    assert "epochs 3 -> 6" in advice[1] and "0.0002 -> 0.0004" in advice[2]
    assert training_advice([2.0] * 30, config)[0].startswith("under-trained: the training loss ended at 2.00")
    assert training_advice([1.5] + [0.05] * 29, config) == []           # learned
    assert training_advice(falling, config, stopped=True) == []         # stopped early: nothing to judge
    assert "steps 50 -> 100" in training_advice(falling, TrainConfig(max_steps=50))[1]
    # A DPO loss is not a cross-entropy (it starts at ln 2 whatever the data): no under-fit advice from it.
    assert training_advice([0.69] * 30, TrainConfig(objective="dpo", batch_size=2)) == []


def _train_args(argv):
    from engine.commands import train

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    train.register(sub)
    return parser.parse_args(["train", *argv])


def test_the_cli_plans_what_is_not_given_with_the_wizards_planner(tiny_llama_dir, tmp_path):
    """`lora-lab train` used 512 x 8 for 61-token examples; now the same planner as the wizard fills the gaps."""
    from engine.commands.train import plan_from_args

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"fact {i} is true"}) + "\n" for i in range(12)))
    base = ["--model", str(tiny_llama_dir), "--data", str(data), "--out", str(tmp_path / "o"), "--backend", "cpu"]
    logged = []
    config, val_split = plan_from_args(_train_args(base), logged.append)
    spec = load_model_spec(tiny_llama_dir)
    planned, planned_val, _ = default_plan([data], tiny_llama_dir, spec, False)
    assert (config.seq_len, config.batch_size, config.epochs, config.lr, val_split) == \
        (planned.seq_len, planned.batch_size, planned.epochs, planned.lr, planned_val)
    assert config.seq_len == 32 and config.batch_size == 4 and any("plan from the data" in m for m in logged)
    given, _ = plan_from_args(_train_args(base + ["--seq-len", "16", "--lr", "1e-4", "--epochs", "2"]), print)
    assert (given.seq_len, given.lr, given.epochs, given.batch_size) == (16, 1e-4, 2, 4)
    short, _ = plan_from_args(_train_args(base + ["--steps", "8"]), print)
    assert (short.max_steps, short.warmup_steps, short.eval_every) == (8, 0, 2)   # paced to the steps given
    with pytest.raises(SystemExit):
        _train_args(base + ["--epochs", "2", "--steps", "5"])
