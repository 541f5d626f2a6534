"""DPO and ORPO on the WGSL backend against PyTorch + PEFT with TRL's formulas (tests/preference_oracle.py), on
the tiny Llama, Qwen2 and Qwen3 models, and against the CPU backend's steps."""
import numpy as np
import pytest

from engine.backends.base import OptimizerConfig, PreferenceStepResult
from engine.backends.preference import PreferenceObjective
from engine.lora.config import LoraConfig
from engine.model.spec import load_model_spec
from tests.oracle import peft_model, random_lora_state
from tests.preference_oracle import dpo_loss_and_grads, orpo_loss_and_grads, random_pairs

pytestmark = pytest.mark.gpu

LORA = LoraConfig(rank=4, alpha=8)
SEQ = 9


def backend(model_dir, gpu_device, state=None, batch=4, seq=SEQ, lora=LORA):
    from engine.backends.wgpu.backend import WgpuBackend
    return WgpuBackend(model_dir, lora, OptimizerConfig(), batch, seq, ctx=gpu_device, lora_state=state)


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


@pytest.mark.parametrize("objective", [PreferenceObjective("dpo", beta=0.5, label_smoothing=0.1),
                                       PreferenceObjective("orpo", orpo_lambda=0.7)], ids=["dpo", "orpo"])
def test_loss_rewards_and_every_grad_match_trl_formulas(tiny_model_dir, gpu_device, objective):
    spec = load_model_spec(tiny_model_dir)
    state = random_lora_state(spec, LORA, seed=3, b_scale=0.3)
    ids, labels = random_pairs(spec.vocab_size, 2, SEQ, seed=4)
    model = peft_model(tiny_model_dir, LORA, state)
    if objective.name == "dpo":
        loss, chosen, _, grads = dpo_loss_and_grads(model, ids, labels, objective.beta, objective.label_smoothing)
    else:
        loss, chosen, _, grads = orpo_loss_and_grads(model, ids, labels, objective.orpo_lambda)
    # Built for 3 pairs and 10 positions: rows and positions of padding that must not count.
    with backend(tiny_model_dir, gpu_device, state, batch=6, seq=SEQ + 1) as be:
        got, tokens, got_grads = be.preference_gradients([(ids, labels)], objective)
        assert all(np.array_equal(v, state[k]) for k, v in be.lora_state().items()), "the reference restores LoRA"
        # A supervised step afterwards sees row weights of 1 again.
        sft = be.gradients([(ids, labels)])[0]
    assert tokens == int((labels[:, 1:] != -100).sum())
    assert abs(got.loss - loss) <= 1e-3 * abs(loss)
    assert abs(got.chosen_reward - chosen.mean()) <= 1e-3 * max(abs(chosen.mean()), 1e-3)
    errors = {k: rel_err(got_grads[k], grads[k]) for k in grads}
    assert max(errors.values()) < 1e-3, max(errors.items(), key=lambda kv: kv[1])
    from tests.oracle import loss_and_grads
    assert sft == pytest.approx(loss_and_grads(model, ids, labels).loss, rel=1e-5)


def test_steps_match_the_cpu_backend_across_micro_batches(tiny_llama_dir, gpu_device):
    from engine.backends.onnx import OnnxBackend

    spec = load_model_spec(tiny_llama_dir)
    ids, labels = random_pairs(spec.vocab_size, 2, SEQ, seed=5)
    halves = [(ids[[k, 2 + k]], labels[[k, 2 + k]]) for k in range(2)]
    objective = PreferenceObjective("dpo", beta=0.5)
    # B ≠ 0: from PEFT's B = 0 the A gradients are rounding noise, which Adam's g/√v blows up to ±lr.
    state = random_lora_state(spec, LORA, seed=7, b_scale=0.3)
    with backend(tiny_llama_dir, gpu_device, state) as gpu, \
            OnnxBackend(tiny_llama_dir, LORA, OptimizerConfig(), 4, SEQ, init_state=state, threads=1) as cpu:
        got = [gpu.preference_step(halves, objective, 2e-2, 1.0).result() for _ in range(3)]
        want = [cpu.preference_step([(ids, labels)], objective, 2e-2, 1.0).result() for _ in range(3)]
        gpu_state, cpu_state = gpu.lora_state(), cpu.lora_state()
    assert all(isinstance(r, PreferenceStepResult) and not r.skipped for r in got)
    assert [r.step for r in got] == [1, 2, 3]
    np.testing.assert_allclose([r.loss for r in got], [r.loss for r in want], rtol=1e-3)
    np.testing.assert_allclose([r.reward_margin for r in got], [r.reward_margin for r in want], rtol=2e-3)
    assert got[-1].loss < got[0].loss
    assert max(rel_err(gpu_state[k], cpu_state[k]) for k in cpu_state) < 1e-3


def test_dropout_is_refused_for_preference_steps(tiny_llama_dir, gpu_device):
    spec = load_model_spec(tiny_llama_dir)
    ids, labels = random_pairs(spec.vocab_size, 2, SEQ, seed=6)
    with backend(tiny_llama_dir, gpu_device, lora=LoraConfig(rank=4, alpha=8, dropout=0.1)) as be:
        with pytest.raises(ValueError, match="set lora dropout to 0"):
            be.preference_step([(ids, labels)], PreferenceObjective(), 1e-3, 1.0)


def test_a_cached_reference_gives_the_step_a_reference_pass_gives(tiny_llama_dir, gpu_device):
    """engine.train.reference keeps each row's reference S from the micro-batch it was first seen in; on the WGSL
    backend a row's S must not depend on the other rows of its micro-batch, so the cached step is identical."""
    from engine.train.reference import ReferenceLogps

    spec = load_model_spec(tiny_llama_dir)
    ids, labels = random_pairs(spec.vocab_size, 2, SEQ, seed=8)
    swapped = [1, 0, 3, 2]                       # the same pairs, in the other order
    objective = PreferenceObjective("dpo", beta=0.5)
    state = random_lora_state(spec, LORA, seed=9, b_scale=0.3)
    with backend(tiny_llama_dir, gpu_device, state) as first, backend(tiny_llama_dir, gpu_device, state) as second:
        cache = ReferenceLogps(lambda i, lab: first.sequence_logps(i, lab, adapter=False)[0], cached=True)
        cache(ids[swapped], labels[swapped])
        reference = cache(ids, labels)
        assert cache.passes == 1
        got = first.preference_step([(ids, labels)], objective, 2e-2, 1.0, reference=[reference]).result()
        want = second.preference_step([(ids, labels)], objective, 2e-2, 1.0).result()
        got_state, want_state = first.lora_state(), second.lora_state()
    assert (got.loss, got.reward_margin, got.grad_norm) == (want.loss, want.reward_margin, want.grad_norm)
    assert all(np.array_equal(got_state[k], want_state[k]) for k in want_state)
