"""Strided perplexity equals Hugging Face's guide loop on the same model, windows and stride."""
import math

import numpy as np
import pytest

from engine.backends.base import OptimizerConfig
from engine.lora.config import LoraConfig
from engine.model.spec import load_model_spec
from engine.train.perplexity import strided_perplexity, windows
from tests.oracle import peft_model, random_lora_state
from tests.perplexity_reference import hf_guide_perplexity
from tests.torch_backend import TorchBackend


@pytest.mark.parametrize("n, window, stride", [(50, 16, 5), (50, 16, 16), (7, 16, 8), (33, 8, 1)])
def test_windows_score_every_token_after_the_first_once(n, window, stride):
    scored = np.zeros(n, int)
    for begin, end, count in windows(n, window, stride):
        assert end - begin <= window and 1 <= count <= end - begin
        scored[end - count:end] += 1
    scored[0] -= 1      # the first token is fed but never predicted (the shift drops it)
    assert (scored[1:] == 1).all() and scored[0] == 0


def test_strided_perplexity_matches_the_hf_guide(tiny_llama_dir):
    spec = load_model_spec(tiny_llama_dir)
    lora = LoraConfig(rank=4, alpha=8)
    state = random_lora_state(spec, lora, seed=2, b_scale=0.2)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, spec.vocab_size, 61).astype(np.int32)
    labels = ids.copy()
    labels[rng.random(61) < 0.2] = -100
    backend = TorchBackend(tiny_llama_dir, lora, OptimizerConfig(), 1, 16, init_state=state)
    ours = strided_perplexity(backend, ids, labels, window=16, stride=6)
    theirs, tokens = hf_guide_perplexity(peft_model(tiny_llama_dir, lora, state), ids, labels, 16, 6)
    assert ours.tokens == tokens == int((labels[1:] != -100).sum())
    assert ours.perplexity == pytest.approx(theirs, rel=1e-5)
    assert ours.perplexity == pytest.approx(math.exp(ours.loss))


def test_strided_perplexity_rejects_bad_windows(tiny_llama_dir):
    backend = TorchBackend(tiny_llama_dir, LoraConfig(rank=1, alpha=1, targets=("q_proj",)), OptimizerConfig(), 1, 8)
    with pytest.raises(ValueError, match="exceeds"):
        strided_perplexity(backend, np.arange(20), window=9)
    with pytest.raises(ValueError, match="stride"):
        strided_perplexity(backend, np.arange(20), window=8, stride=9)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        strided_perplexity(backend, np.arange(1))
