"""Training steps of the WGSL engine: AdamW trajectory vs torch, 8-bit AdamW, the non-finite guard, lagged results."""
import numpy as np
import pytest

from engine.backends.base import OptimizerConfig
from engine.lora.config import LoraConfig, init_lora_state
from engine.model.spec import load_model_spec
from tests.oracle import adamw_trajectory, peft_model, random_batch, random_lora_state

pytestmark = pytest.mark.gpu

B, T = 2, 6


def backend(model_dir, ctx, lora, state, optim=None, **kw):
    from engine.backends.wgpu.backend import WgpuBackend
    return WgpuBackend(model_dir, lora, optim or OptimizerConfig(), B, T, ctx=ctx, lora_state=state, **kw)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_twenty_adamw_steps_follow_torch(tiny_model_dirs, gpu_device, arch):
    model_dir = tiny_model_dirs[arch]
    spec = load_model_spec(model_dir)
    lora = LoraConfig(rank=4, alpha=8)
    state = init_lora_state(spec, lora, seed=3)        # PEFT's own start: B = 0
    batches = [random_batch(spec.vocab_size, B, T, seed=s) for s in range(3)]
    want = adamw_trajectory(peft_model(model_dir, lora, state), batches, lr=1e-2, steps=20, weight_decay=0.01,
                            max_grad_norm=1.0)
    with backend(model_dir, gpu_device, lora, state, OptimizerConfig(weight_decay=0.01)) as be:
        pending = [be.train_step([batches[i % 3]], lr=1e-2, max_grad_norm=1.0) for i in range(20)]
        results = [p.result() for p in pending]        # read after all 20 were submitted: the history ring holds
    np.testing.assert_allclose([r.loss for r in results], want, rtol=1e-3)
    assert [r.step for r in results] == list(range(1, 21))
    assert not any(r.skipped for r in results)
    assert all(r.tokens == int((b[1][:, 1:] != -100).sum()) for r, b in zip(results, batches * 7))
    assert want[-1] < want[0] - 0.1, "the trajectory is long enough to move"


def test_adamw8bit_lowers_the_loss_and_stays_finite(tiny_llama_dir, gpu_device):
    spec = load_model_spec(tiny_llama_dir)
    lora = LoraConfig(rank=4, alpha=8)
    batch = random_batch(spec.vocab_size, B, T, seed=9)
    with backend(tiny_llama_dir, gpu_device, lora, init_lora_state(spec, lora, 1),
                 OptimizerConfig(name="adamw8bit", block_size=64)) as be:
        losses = [be.train_step([batch], lr=2e-2, max_grad_norm=1.0).result().loss for _ in range(12)]
        state = be.lora_state()
    assert np.isfinite(losses).all() and all(np.isfinite(v).all() for v in state.values())
    assert losses[-1] < losses[0] - 0.2


def test_non_finite_step_is_skipped_and_changes_nothing(tiny_llama_dir, gpu_device):
    spec = load_model_spec(tiny_llama_dir)
    lora = LoraConfig(rank=2, alpha=4)
    state = random_lora_state(spec, lora, seed=2)
    batch = random_batch(spec.vocab_size, B, T, seed=4)
    with backend(tiny_llama_dir, gpu_device, lora, state) as be:
        first = be.train_step([batch], lr=1e-2, max_grad_norm=0.0).result()
        assert first.step == 1 and not first.skipped
        good = be.lora_state()
        moments = be.optimizer_state()
        key = next(k for k in good if ".lora_B." in k)
        be.load_lora_state({**good, key: np.full_like(good[key], np.inf)})
        bad = be.train_step([batch], lr=1e-2, max_grad_norm=0.0).result()
        assert bad.skipped and bad.step == 1 and not np.isfinite(bad.loss)
        after = be.lora_state()
        assert all(np.array_equal(after[k], good[k]) for k in good if k != key)
        from engine.backends.wgpu.backend import DROPOUT_STEP_KEY
        for name, value in be.optimizer_state().items():
            if name == DROPOUT_STEP_KEY:   # counts submitted steps (a fresh mask each), skipped ones too
                assert value == moments[name] + 1
            else:
                np.testing.assert_array_equal(value, moments[name])
        be.load_lora_state(good)
        again = be.train_step([batch], lr=1e-2, max_grad_norm=0.0).result()
        assert again.step == 2 and not again.skipped and np.isfinite(again.loss)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_optimizer_state_round_trips_into_a_new_backend(tiny_llama_dir, gpu_device, dropout):
    """Resume is exact, with LoRA dropout too: the dropout-mask counter travels with the optimizer state."""
    spec = load_model_spec(tiny_llama_dir)
    lora = LoraConfig(rank=2, alpha=4, dropout=dropout)
    batches = [random_batch(spec.vocab_size, B, T, seed=s) for s in range(2)]
    with backend(tiny_llama_dir, gpu_device, lora, init_lora_state(spec, lora, 0)) as a:
        a.train_step([batches[0]], 1e-2, 1.0)
        saved_lora, saved_opt = a.lora_state(), a.optimizer_state()
        want = a.train_step([batches[1]], 1e-2, 1.0).result()
        want_state = a.lora_state()
    with backend(tiny_llama_dir, gpu_device, lora, saved_lora) as b:
        b.load_optimizer_state(saved_opt)
        got = b.train_step([batches[1]], 1e-2, 1.0).result()
        assert got.step == want.step == 2 and got.loss == pytest.approx(want.loss, rel=1e-6)
        for k, v in b.lora_state().items():
            np.testing.assert_allclose(v, want_state[k], rtol=1e-6, atol=1e-7)


def test_optimizer_state_is_saved_in_peft_order(tiny_llama_dir, gpu_device):
    """With grouped LoRA products (every target, no dropout) the moments still come out tensor by tensor in the
    ungrouped layout (PEFT's order, each tensor aligned), so checkpoints mean the same with or without groups:
    after one step m = (1 − β1)·g for each tensor at its place in that layout."""
    from engine.backends.wgpu.buffers import lora_groups, lora_layout
    spec = load_model_spec(tiny_llama_dir)
    lora = LoraConfig(rank=3, alpha=6)
    assert lora_groups(lora)
    batch = random_batch(spec.vocab_size, B, T, seed=1)
    with backend(tiny_llama_dir, gpu_device, lora, random_lora_state(spec, lora, seed=2)) as be:
        _, _, grads = be.gradients([batch])
        be.train_step([batch], lr=1e-2, max_grad_norm=0.0).result()
        m = be.optimizer_state()["m"]
    saved = lora_layout(spec, lora, grouped=False)
    assert saved.offsets != lora_layout(spec, lora).offsets and len(m) == saved.total
    for key, at in saved.offsets.items():
        got = m[at:at + grads[key].size].reshape(grads[key].shape)
        np.testing.assert_allclose(got, 0.1 * grads[key], rtol=1e-5, atol=1e-9)


def test_lora_dropout_trains_and_evaluation_ignores_it(tiny_llama_dir, gpu_device):
    spec = load_model_spec(tiny_llama_dir)
    lora = LoraConfig(rank=4, alpha=8, dropout=0.3)
    state = random_lora_state(spec, lora, seed=5)
    batch = random_batch(spec.vocab_size, B, T, seed=6)
    plain = LoraConfig(rank=4, alpha=8)
    with backend(tiny_llama_dir, gpu_device, plain, state) as ref:
        want = ref.eval_loss(*batch)
    with backend(tiny_llama_dir, gpu_device, lora, state) as be:
        assert be.eval_loss(*batch) == pytest.approx(want, rel=1e-6)
        losses = [be.train_step([batch], lr=1e-2, max_grad_norm=1.0).result().loss for _ in range(8)]
        assert be.eval_loss(*batch)[0] < want[0]
    assert np.isfinite(losses).all()
