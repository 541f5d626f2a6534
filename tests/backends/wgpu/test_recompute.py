"""Activation recompute: the same bits as keeping every activation (loss, every LoRA gradient, AdamW steps), and
PyTorch + PEFT's numbers, on three-layer tiny models (so a middle layer recomputes from another layer's output)."""
import numpy as np
import pytest

from bench.tiny_models import ARCHITECTURES, make_model
from engine.backends.base import OptimizerConfig
from engine.lora.config import LoraConfig, peft_key
from engine.model.spec import load_model_spec
from tests.backends.wgpu.test_backend import assert_grads_match
from tests.oracle import adamw_trajectory, loss_and_grads, peft_model, random_batch, random_lora_state

pytestmark = pytest.mark.gpu

B, T = 2, 7
LAYERS = 3
STEPS = 3
# Gemma 3 too: its post-MLP norm's backward reads down_proj's output, which the recompute must refill.
RECOMPUTED = (*ARCHITECTURES, "gemma3")


@pytest.fixture(scope="module")
def three_layer_dirs(tmp_path_factory):
    dirs = {}
    for arch in RECOMPUTED:
        dirs[arch] = tmp_path_factory.mktemp(f"tiny-{arch}-3-layers")
        make_model(arch, dirs[arch], seed=7, num_hidden_layers=LAYERS)
    return dirs


def backend(model_dir, ctx, lora, state, recompute):
    from engine.backends.wgpu.backend import WgpuBackend
    return WgpuBackend(model_dir, lora, OptimizerConfig(weight_decay=0.01), B, T, ctx=ctx, lora_state=state,
                       seed=5, recompute=recompute)


def micro_batches(vocab: int):
    """Five sequences of 6 tokens as three micro-batches (one padded to [B, T] in both dimensions), and the
    joint batch the oracle sees."""
    ids, labels = random_batch(vocab, 5, 6, seed=11)
    return [(ids[:2], labels[:2]), (ids[2:3], labels[2:3]), (ids[3:], labels[3:])], (ids, labels)


def run(model_dir, ctx, lora, state, micro, recompute):
    """(loss, gradients) of the micro-batches, then STEPS AdamW steps: their results, LoRA and optimizer state."""
    with backend(model_dir, ctx, lora, state, recompute) as be:
        if recompute:   # really one shared set: the test below would pass trivially otherwise
            assert be.acts[0].ln1 is be.acts[LAYERS - 1].ln1 and be.acts[0].x_out is not be.acts[1].x_out
        loss, _, grads = be.gradients(micro)
        steps = [be.train_step(micro, lr=1e-2, max_grad_norm=1.0) for _ in range(STEPS)]
        steps = [(r.loss, r.grad_norm, r.tokens) for r in (p.result() for p in steps)]
        return loss, grads, steps, be.lora_state(), be.optimizer_state()


LORAS = {
    "all targets": LoraConfig(rank=3, alpha=6),
    "dropout": LoraConfig(rank=2, alpha=5, dropout=0.2, targets=("q_proj", "v_proj", "o_proj", "down_proj")),
}


@pytest.mark.parametrize("lora_name", list(LORAS))
@pytest.mark.parametrize("arch", RECOMPUTED)
def test_recompute_gives_the_same_bits(three_layer_dirs, gpu_device, arch, lora_name):
    model_dir, lora = three_layer_dirs[arch], LORAS[lora_name]
    spec = load_model_spec(model_dir)
    state = random_lora_state(spec, lora, seed=2)
    micro, _ = micro_batches(spec.vocab_size)
    loss, grads, steps, lora_state, optim_state = run(model_dir, gpu_device, lora, state, micro, recompute=False)
    r_loss, r_grads, r_steps, r_lora_state, r_optim_state = run(model_dir, gpu_device, lora, state, micro,
                                                                recompute=True)
    assert r_loss == loss
    assert set(r_grads) == set(grads)
    for key in grads:
        assert np.array_equal(r_grads[key], grads[key]), key
    assert r_steps == steps
    for key in lora_state:
        assert np.array_equal(r_lora_state[key], lora_state[key]), key
    assert set(r_optim_state) == set(optim_state)
    for key in optim_state:
        assert np.array_equal(r_optim_state[key], optim_state[key]), key


@pytest.mark.parametrize("arch", RECOMPUTED)
def test_recompute_matches_peft(three_layer_dirs, gpu_device, arch):
    """Gradients of accumulated micro-batches, and the first AdamW steps' losses, against PEFT on the joint batch."""
    model_dir, lora = three_layer_dirs[arch], LORAS["all targets"]
    spec = load_model_spec(model_dir)
    state = random_lora_state(spec, lora, seed=2)
    micro, (ids, labels) = micro_batches(spec.vocab_size)
    ref = loss_and_grads(peft_model(model_dir, lora, state), ids, labels)
    want = adamw_trajectory(peft_model(model_dir, lora, state), [(ids, labels)], lr=1e-2, steps=STEPS,
                            weight_decay=0.01, max_grad_norm=1.0)
    loss, grads, steps, _, _ = run(model_dir, gpu_device, lora, state, micro, recompute=True)
    assert loss == pytest.approx(ref.loss, rel=1e-5)
    assert_grads_match(grads, ref.grads)
    np.testing.assert_allclose([s[0] for s in steps], want, rtol=1e-3)


def test_skipping_the_recompute_would_be_wrong(three_layer_dirs, gpu_device):
    """The control: on the shared activations without re-running the forward, every layer below the last reads
    the last layer's activations, and its gradients change; the last layer's do not. So the bit-exact test above
    can fail. Also covers an adapter without down_proj (the recompute then ends at SwiGLU)."""
    model_dir = three_layer_dirs["llama"]
    spec = load_model_spec(model_dir)
    lora = LoraConfig(rank=2, alpha=4, targets=("q_proj", "o_proj", "up_proj"))
    state = random_lora_state(spec, lora, seed=3)
    micro, _ = micro_batches(spec.vocab_size)
    with backend(model_dir, gpu_device, lora, state, recompute=False) as be:
        _, _, want = be.gradients(micro)
    with backend(model_dir, gpu_device, lora, state, recompute=True) as be:
        _, _, got = be.gradients(micro)
        be.model.recompute = False
        _, _, skipped = be.gradients(micro)
    for key in want:
        assert np.array_equal(got[key], want[key]), key
    last = {peft_key(LAYERS - 1, t, m) for t in lora.targets for m in "AB"}
    for key in want:
        assert np.array_equal(skipped[key], want[key]) == (key in last), key
