"""DPO and ORPO on the CPU backend against PyTorch + PEFT with TRL's formulas (tests/preference_oracle.py), on the
tiny Llama, Qwen2 and Qwen3 models: loss, rewards and every LoRA gradient."""
import numpy as np
import pytest

from engine.backends.base import OptimizerConfig, PreferenceStepResult
from engine.backends.onnx import OnnxBackend
from engine.backends.preference import PreferenceObjective
from engine.lora.config import LoraConfig
from engine.model.spec import load_model_spec
from tests.oracle import peft_model, random_lora_state
from tests.preference_oracle import dpo_loss_and_grads, orpo_loss_and_grads, random_pairs

LORA = LoraConfig(rank=4, alpha=8)
PAIRS, SEQ = 2, 11


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


def oracle(model, objective: PreferenceObjective, ids, labels):
    if objective.name == "dpo":
        return dpo_loss_and_grads(model, ids, labels, objective.beta, objective.label_smoothing)
    return orpo_loss_and_grads(model, ids, labels, objective.orpo_lambda)


@pytest.mark.parametrize("objective", [PreferenceObjective("dpo", beta=0.5),
                                       PreferenceObjective("dpo", beta=2.0, label_smoothing=0.2),
                                       PreferenceObjective("orpo", orpo_lambda=0.7)],
                         ids=["dpo", "dpo-smoothed", "orpo"])
def test_loss_rewards_and_every_grad_match_trl_formulas(tiny_model_dir, objective):
    spec = load_model_spec(tiny_model_dir)
    state = random_lora_state(spec, LORA, seed=3, b_scale=0.3)   # a policy far enough from the reference
    ids, labels = random_pairs(spec.vocab_size, PAIRS, SEQ, seed=4)
    loss, chosen, rejected, grads = oracle(peft_model(tiny_model_dir, LORA, state), objective, ids, labels)
    # Built for 3 pairs and 13 positions: the batch is padded with rows and positions that must not count.
    with OnnxBackend(tiny_model_dir, LORA, OptimizerConfig(), 6, 13, init_state=state, threads=1) as backend:
        got, tokens, got_grads = backend.preference_gradients([(ids, labels)], objective)
    assert tokens == int((labels[:, 1:] != -100).sum()) and got.pairs == PAIRS
    assert abs(got.loss - loss) <= 1e-3 * abs(loss)
    assert abs(got.chosen_reward - chosen.mean()) <= 1e-3 * max(abs(chosen.mean()), 1e-3)
    assert got.reward_accuracy == float(np.mean(chosen > rejected))
    assert got_grads.keys() == grads.keys()
    errors = {k: rel_err(got_grads[k], grads[k]) for k in grads}
    assert max(errors.values()) < 1e-3, max(errors.items(), key=lambda kv: kv[1])


def test_micro_batches_of_pairs_accumulate_like_one_batch(tiny_llama_dir):
    spec = load_model_spec(tiny_llama_dir)
    state = random_lora_state(spec, LORA, seed=5, b_scale=0.3)
    ids, labels = random_pairs(spec.vocab_size, 2, SEQ, seed=6)
    halves = [(ids[[k, 2 + k]], labels[[k, 2 + k]]) for k in range(2)]
    for objective in (PreferenceObjective("dpo"), PreferenceObjective("orpo")):
        with OnnxBackend(tiny_llama_dir, LORA, OptimizerConfig(), 4, SEQ, init_state=state, threads=1) as backend:
            whole = backend.preference_gradients([(ids, labels)], objective)
            split = backend.preference_gradients(halves, objective)
        assert abs(whole[0].loss - split[0].loss) < 1e-6 and whole[1] == split[1]
        assert max(rel_err(split[2][k], whole[2][k]) for k in whole[2]) < 1e-4


def test_the_reference_is_the_base_model(tiny_llama_dir):
    spec = load_model_spec(tiny_llama_dir)
    ids, labels = random_pairs(spec.vocab_size, 2, SEQ, seed=7)
    with OnnxBackend(tiny_llama_dir, LORA, OptimizerConfig(), 4, SEQ, threads=1) as base:
        want, counts = base.sequence_logps(ids, labels)           # PEFT's init: B = 0, the base model itself
    state = random_lora_state(spec, LORA, seed=8, b_scale=0.3)
    with OnnxBackend(tiny_llama_dir, LORA, OptimizerConfig(), 4, SEQ, init_state=state, threads=1) as backend:
        off, off_counts = backend.sequence_logps(ids, labels, adapter=False)
        on, _ = backend.sequence_logps(ids, labels)
        assert backend.lora_state().keys() == state.keys()
        assert all(np.array_equal(v, state[k]) for k, v in backend.lora_state().items())
    np.testing.assert_allclose(off, want, rtol=1e-6)
    assert off_counts.tolist() == counts.tolist() == (labels[:, 1:] != -100).sum(1).tolist()
    assert np.abs(on - off).max() > 1e-3


def test_dpo_steps_raise_the_reward_accuracy_and_report_metrics(tiny_llama_dir):
    spec = load_model_spec(tiny_llama_dir)
    ids, labels = random_pairs(spec.vocab_size, 3, SEQ, seed=9)
    objective = PreferenceObjective("dpo", beta=0.5)
    with OnnxBackend(tiny_llama_dir, LORA, OptimizerConfig(), 6, SEQ, threads=1) as backend:
        results = [backend.preference_step([(ids, labels)], objective, lr=2e-2, max_grad_norm=1.0).result()
                   for _ in range(8)]
    first, last = results[0], results[-1]
    assert isinstance(first, PreferenceStepResult) and not any(r.skipped for r in results)
    assert abs(first.loss - np.log(2)) < 1e-6 and first.reward_margin == 0.0   # B = 0: policy = reference
    assert last.loss < first.loss and last.reward_margin > 0 and last.reward_accuracy == 1.0
    assert [r.step for r in results] == list(range(1, 9))


def test_non_finite_preference_step_is_skipped(tiny_llama_dir):
    from engine.lora.config import peft_key

    spec = load_model_spec(tiny_llama_dir)
    ids, labels = random_pairs(spec.vocab_size, 2, SEQ, seed=10)
    with OnnxBackend(tiny_llama_dir, LORA, OptimizerConfig(), 4, SEQ, threads=1) as backend:
        state = backend.lora_state()
        state[peft_key(0, "v_proj", "B")][0, 0] = np.inf
        backend.load_lora_state(state)
        before = backend.lora_state()
        result = backend.preference_step([(ids, labels)], PreferenceObjective("orpo"), 1e-3, 1.0).result()
        assert result.skipped and result.step == 0
        after = backend.lora_state()
        assert all(np.array_equal(before[k], after[k], equal_nan=True) for k in before)


def test_bad_preference_input_is_refused_clearly(tiny_llama_dir):
    spec = load_model_spec(tiny_llama_dir)
    ids, labels = random_pairs(spec.vocab_size, 2, SEQ, seed=11)
    labels[3] = -100                                 # pair 1 lost its rejected answer
    with OnnxBackend(tiny_llama_dir, LORA, OptimizerConfig(), 4, SEQ, threads=1) as backend:
        with pytest.raises(ValueError, match="pair 1 has a counted token in only one"):
            backend.preference_step([(ids, labels)], PreferenceObjective(), 1e-3, 1.0)
    dropout = LoraConfig(rank=4, alpha=8, dropout=0.1)
    with OnnxBackend(tiny_llama_dir, dropout, OptimizerConfig(), 4, SEQ, threads=1) as backend:
        with pytest.raises(ValueError, match="set lora dropout to 0"):
            backend.preference_step([(ids, labels)], PreferenceObjective(), 1e-3, 1.0)
    with pytest.raises(ValueError, match="objective 'kto' is unknown"):
        PreferenceObjective("kto")
    with pytest.raises(ValueError, match="label_smoothing must be a number in"):
        PreferenceObjective(label_smoothing=0.5)
