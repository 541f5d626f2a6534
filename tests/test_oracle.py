"""The oracle itself: HF's loss equals a hand-computed shifted, masked cross-entropy, and B=0 means base logits."""
import numpy as np

from engine.lora.config import LoraConfig, init_lora_state
from engine.model.spec import load_model_spec
from tests.oracle import loss_and_grads, peft_model, random_batch, random_lora_state


def test_oracle_loss_is_shifted_masked_mean(tiny_llama_dir):
    spec = load_model_spec(tiny_llama_dir)
    lora = LoraConfig(rank=4, alpha=8)
    model = peft_model(tiny_llama_dir, lora, random_lora_state(spec, lora))
    ids, labels = random_batch(spec.vocab_size, 2, 7, seed=3)
    step = loss_and_grads(model, ids, labels)
    logits = step.logits[:, :-1].astype(np.float64)
    target = labels[:, 1:]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    mask = target != -100
    picked = np.take_along_axis(logits, np.where(mask, target, 0)[..., None], -1)[..., 0]
    assert np.isclose(step.loss, ((logz - picked) * mask).sum() / mask.sum(), rtol=1e-5)
    assert all(np.abs(g).sum() > 0 for g in step.grads.values())


def test_zero_b_gives_base_logits(tiny_llama_dir):
    from transformers import AutoModelForCausalLM
    import torch
    spec = load_model_spec(tiny_llama_dir)
    lora = LoraConfig(rank=4, alpha=8)
    model = peft_model(tiny_llama_dir, lora, init_lora_state(spec, lora))
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, attn_implementation="eager")
    ids = np.arange(10, dtype=np.int64)[None]
    with torch.no_grad():
        np.testing.assert_allclose(model(torch.from_numpy(ids)).logits.numpy(),
                                   base(torch.from_numpy(ids)).logits.numpy(), atol=1e-6)
