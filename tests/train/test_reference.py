"""DPO's reference log-probabilities cached per pair (engine.train.reference): when the cache is chosen, that a
cached run trains exactly as a run with a reference pass every step, with fewer passes, and resumes exactly."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from engine.lora.config import LoraConfig
from engine.train.config import TrainConfig
from engine.train.reference import ReferenceLogps, choose_reference_mode
from engine.train.runs import RunInputs, prepare_run
from engine.train.trainer import TrainerCallback

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon"]


def test_auto_caches_when_a_pair_is_seen_twice():
    assert choose_reference_mode("auto", 10, 1, 10, 1) == "per-step"         # one epoch, one evaluation
    assert choose_reference_mode("auto", 11, 1, 10, 0) == "cached"           # into a second epoch
    assert choose_reference_mode("auto", 6, 2, 10, 0) == "cached"            # 12 micro-batches of 10
    assert choose_reference_mode("auto", 4, 1, 10, 2) == "cached"            # validation twice
    assert choose_reference_mode("per-step", 100, 1, 10, 5) == "per-step"
    with pytest.raises(ValueError, match="reference-logps 'once' is unknown"):
        TrainConfig(objective="dpo", batch_size=2, reference_logps="once")


def test_the_cache_runs_a_micro_batch_only_while_one_of_its_rows_is_new():
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 50, (4, 7)).astype(np.int32)
    labels = np.where(rng.random((4, 7)) < 0.5, ids, -100).astype(np.int32)
    seen = []

    def forward(i, lab):        # a function of each row alone, as a forward pass is
        seen.append(i.shape[0])
        return (i * (lab != -100)).sum(1).astype(np.float64)

    cached = ReferenceLogps(forward, cached=True)
    first = cached(ids, labels)
    again = cached(ids[::-1].copy(), labels[::-1].copy())             # the same rows in another order
    np.testing.assert_array_equal(again, first[::-1])
    assert cached.passes == 1
    mixed = np.concatenate([ids[:2], ids[:2] + 1])                    # two rows not seen yet
    cached(mixed, np.concatenate([labels[:2], labels[:2]]))
    assert cached.passes == 2
    per_step = ReferenceLogps(forward, cached=False)
    per_step(ids, labels), per_step(ids, labels)
    assert per_step.passes == 2


def pair_file(path, n=10):
    rows = []
    for i in range(n):
        a, b = WORDS[i % 7], WORDS[(3 * i + 2) % 7]
        rows.append({"prompt": f"Name {a} and {b}.", "chosen": f"The {b} and the {a}, thank you!",
                     "rejected": f"{a} {b}" + "." * (i % 3)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


class Events(TrainerCallback):
    def __init__(self):
        self.steps, self.evals = [], []

    def on_step(self, event):
        self.steps.append((event.step, event.loss, event.reward_margin, event.reward_accuracy, event.grad_norm))

    def on_eval(self, event):
        self.evals.append((event.step, event.loss, event.reward_margin, event.reward_accuracy))


def run(model_dir, data, out, config, resume=None):
    events = Events()
    logs = []
    prepared = prepare_run(config, RunInputs(model=str(model_dir), data=(str(data),), val_split=0.2, backend="cpu"),
                           out, callback=events, resume=resume, log=logs.append)
    summary = prepared.trainer.run()
    return events, summary, prepared.trainer, logs


def test_cached_and_per_step_reference_give_identical_runs_on_the_cpu_backend(tiny_llama_dir, tmp_path):
    """Three epochs of DPO on 8 training pairs (4 micro-batches of 2 pairs an epoch, two micro-batches a step,
    reshuffled each epoch) and 2 validation pairs evaluated every 2 steps: losses, rewards and the adapter are
    bit-identical; the cached run makes the reference passes of its first epoch and first evaluation only."""
    from safetensors.numpy import load_file

    data = pair_file(tmp_path / "pairs.jsonl")
    config = TrainConfig(lora=LoraConfig(rank=4, alpha=8.0), batch_size=4, grad_accum=2, seq_len=40, epochs=3,
                         lr=5e-3, objective="dpo", beta=0.5, eval_every=2, save_every=3, keep_checkpoints=2)
    cached = run(tiny_llama_dir, data, tmp_path / "cached", replace(config, reference_logps="cached"))
    per_step = run(tiny_llama_dir, data, tmp_path / "per-step", replace(config, reference_logps="per-step"))
    (c_events, c_summary, c_trainer, c_logs), (p_events, _, p_trainer, p_logs) = cached, per_step
    assert len(c_events.steps) == 6 and [e[0] for e in c_events.evals] == [2, 4, 6]
    assert c_events.steps == p_events.steps and c_events.evals == p_events.evals
    assert c_events.steps[-1][1] < c_events.steps[0][1]
    adapter_c = load_file(tmp_path / "cached" / "adapter_model.safetensors")
    adapter_p = load_file(tmp_path / "per-step" / "adapter_model.safetensors")
    assert all(np.array_equal(adapter_c[k], adapter_p[k]) for k in adapter_p)
    # Per step: 4 micro-batches x 3 epochs + 1 validation batch x 3 evaluations; cached: the first epoch's 4 + 1.
    assert (p_trainer.reference.passes, c_trainer.reference.passes) == (15, 5)
    assert any("computed once per pair" in line for line in c_logs)
    assert any("a forward pass for every micro-batch" in line for line in p_logs)
    card = (tmp_path / "cached" / "README.md").read_text(encoding="utf-8")
    assert "cached per pair" in card
    # Exact resume from the checkpoint after step 3 (mid second epoch): the cache starts empty and refills
    # with the values a pass gives again.
    checkpoint = tmp_path / "cached" / "checkpoints" / "checkpoint-00000003"
    resumed, _, r_trainer, _ = run(tiny_llama_dir, data, tmp_path / "cached", config, resume=checkpoint)
    assert resumed.steps == c_events.steps[3:] and r_trainer.reference_mode == "cached"
    again = load_file(tmp_path / "cached" / "adapter_model.safetensors")
    assert all(np.array_equal(again[k], adapter_c[k]) for k in adapter_c)
    assert c_summary.steps == 6
