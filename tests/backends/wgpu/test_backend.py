"""The WGSL engine as a whole against transformers + PEFT + torch autograd on the tiny Llama/Qwen2/Qwen3 models."""
import numpy as np
import pytest

from engine.backends.base import OptimizerConfig, counted_tokens
from engine.lora.config import LoraConfig
from engine.model.spec import load_model_spec
from tests.oracle import loss_and_grads, peft_model, random_batch, random_lora_state

pytestmark = pytest.mark.gpu

B, T = 2, 7


def backend(model_dir, gpu_device, lora, state, **kw):
    from engine.backends.wgpu.backend import WgpuBackend
    return WgpuBackend(model_dir, lora, kw.pop("optim", OptimizerConfig()), kw.pop("batch_size", B),
                       kw.pop("seq_len", T), ctx=gpu_device, lora_state=state, **kw)


def assert_grads_match(got: dict, want: dict, rtol=1e-3):
    assert set(got) == set(want)
    for key, ref in want.items():
        err = np.abs(got[key] - ref).max() / max(np.abs(ref).max(), 1e-12)
        assert err < rtol, f"{key}: relative error {err:.2e}"


@pytest.mark.parametrize("masked_fraction", [0.0, 0.4])
def test_logits_loss_and_every_lora_gradient_match_peft(tiny_model_dir, gpu_device, masked_fraction):
    spec = load_model_spec(tiny_model_dir)
    lora = LoraConfig(rank=4, alpha=8)
    state = random_lora_state(spec, lora, seed=1)
    ids, labels = random_batch(spec.vocab_size, B, T, seed=2, masked_fraction=masked_fraction)
    ref = loss_and_grads(peft_model(tiny_model_dir, lora, state), ids, labels)
    with backend(tiny_model_dir, gpu_device, lora, state) as be:
        # The LM head's d(hidden) (K = vocabulary) takes the split-K path here, so the model tests cover it (by
        # rule; with LORA_LAB_GEMM_TUNE=1 the autotune may measure it faster whole).
        assert gpu_device.gemm_tuner is not None or any(
            mm.splits > 1 for *_, bwd in be.model.lm_head.chunks for mm in bwd)
        np.testing.assert_allclose(be.logits(ids), ref.logits, atol=1e-4, rtol=0)
        loss, tokens, grads = be.gradients([(ids, labels)])
        assert loss == pytest.approx(ref.loss, rel=1e-5)
        assert tokens == int((labels[:, 1:] != -100).sum())
        assert_grads_match(grads, ref.grads)


def test_accumulated_padded_micro_batches_equal_one_batch(tiny_llama_dir, gpu_device):
    """Micro-batches smaller than [B, T] are padded (padding never counts); their sum equals the joint batch,
    also past the micro-batches one submit stages (STAGE_SLOTS = 4)."""
    spec = load_model_spec(tiny_llama_dir)
    lora = LoraConfig(rank=3, alpha=6, targets=("q_proj", "v_proj", "down_proj"), use_rslora=True)
    state = random_lora_state(spec, lora, seed=4)
    ids, labels = random_batch(spec.vocab_size, 7, 5, seed=5)
    ref = loss_and_grads(peft_model(tiny_llama_dir, lora, state), ids, labels)
    with backend(tiny_llama_dir, gpu_device, lora, state) as be:
        loss, _, grads = be.gradients([(ids[:2], labels[:2])] + [(ids[i:i + 1], labels[i:i + 1]) for i in range(2, 7)])
        assert loss == pytest.approx(ref.loss, rel=1e-5)
        assert_grads_match(grads, ref.grads)
        np.testing.assert_allclose(be.logits(ids[:1, :4]), ref.logits[:1, :4], atol=1e-4, rtol=0)


def test_eval_loss_is_summed_and_counted(tiny_llama_dir, gpu_device):
    spec = load_model_spec(tiny_llama_dir)
    lora = LoraConfig(rank=2, alpha=4)
    state = random_lora_state(spec, lora, seed=6)
    ids, labels = random_batch(spec.vocab_size, B, T, seed=7)
    ref = loss_and_grads(peft_model(tiny_llama_dir, lora, state), ids, labels)
    with backend(tiny_llama_dir, gpu_device, lora, state) as be:
        total, counted = be.eval_loss(ids, labels)
        assert counted == counted_tokens(labels)
        assert total / counted == pytest.approx(ref.loss, rel=1e-5)
        # evaluation left no gradients behind
        assert not any(np.abs(g).sum() for g in be._read_flat(be.scratch.lora_grads).values())


def test_lora_state_round_trips_and_mismatches_are_named(tiny_llama_dir, gpu_device):
    spec = load_model_spec(tiny_llama_dir)
    lora = LoraConfig(rank=2, alpha=4)
    state = random_lora_state(spec, lora, seed=8)
    with backend(tiny_llama_dir, gpu_device, lora, state) as be:
        got = be.lora_state()
        assert set(got) == set(state) and all(np.array_equal(got[k], state[k]) for k in state)
        key = next(iter(state))
        with pytest.raises(ValueError, match="has shape"):
            be.load_lora_state({**state, key: np.zeros((1, 1), np.float32)})
        with pytest.raises(ValueError, match="missing"):
            be.load_lora_state({k: v for k, v in state.items() if k != key})
        with pytest.raises(ValueError, match="exceeds"):
            be.eval_loss(*random_batch(spec.vocab_size, B + 1, T))


def test_single_position_sequences(tiny_model_dirs, gpu_device):
    """T = 1: every kernel sees one position per sequence (attention to itself only)."""
    model_dir = tiny_model_dirs["qwen2"]
    spec = load_model_spec(model_dir)
    lora = LoraConfig(rank=2, alpha=4)
    state = random_lora_state(spec, lora, seed=9)
    ids = np.array([[5], [77], [300]], np.int32)
    import torch
    with torch.no_grad():
        want = peft_model(model_dir, lora, state)(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    with backend(model_dir, gpu_device, lora, state, batch_size=3, seq_len=1) as be:
        np.testing.assert_allclose(be.logits(ids), want, atol=1e-4, rtol=0)
