"""Config quirks that change what a model computes, on both training backends against transformers + PEFT.

Biases (Llama attention_bias on q/k/v/o, Llama mlp_bias on gate/up/down, Qwen3 attention_bias) are trained
exactly, and so are sliding windows (Mistral's on every layer, Qwen2's from max_window_layers on, Qwen3's and
Gemma 3's by layer_types) on sequences longer than the window, and yarn and longrope rope scaling. Every bias is random and
non-zero, so dropping one fails; every window cuts keys at the test's length, and each rope scaling moves the
logits, so ignoring any fails.
"""
import numpy as np
import pytest

from engine.backends.base import OptimizerConfig
from engine.lora.config import LoraConfig
from engine.model.hf_names import module_path
from engine.model.spec import load_model_spec
from engine.backends.onnx import OnnxBackend
from tests.oracle import loss_and_grads, peft_model, random_batch, random_lora_state
from bench.tiny_models import make_model

B, T, WINDOW = 2, 7, 4
LORA = LoraConfig(rank=3, alpha=6)

BIASED = {
    "llama-attention-bias": ("llama", dict(attention_bias=True)),
    # An MLP width over 2·SPLIT_MIN_K: down_proj's forward (K = 263, 14 rows) is split over K on the WGSL
    # backend, so its bias is added by the split-K reduction.
    "llama-mlp-bias": ("llama", dict(mlp_bias=True, intermediate_size=263)),
    "qwen3-attention-bias": ("qwen3", dict(attention_bias=True)),
}
WINDOWED = {
    # Mistral: every layer windowed. Qwen2: only layers from max_window_layers on (here layer 1 of 2). Qwen3:
    # layer 0 by layer_types. Gemma 3: its sliding layers 0 and 2 around the global layer 1 (own rope thetas).
    "mistral-window": ("llama", dict(model_type="mistral", sliding_window=WINDOW)),
    "qwen2-window": ("qwen2", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "qwen3-window": ("qwen3", dict(use_sliding_window=True, sliding_window=WINDOW,
                                   layer_types=["sliding_attention", "full_attention"])),
    "gemma3-window": ("gemma3", dict(sliding_window=WINDOW)),
}
# yarn rope: most frequencies interpolated at these tiny shapes (original length 32), and cos/sin times the
# attention factor (0.1·ln(factor) + 1, or the mscale ratio); Gemma 3's global layers only. longrope: an original
# length (5) below T, so its long factors apply, and its attention factor from max_position_embeddings / 5.
ROPED = {
    "llama-yarn": ("llama", dict(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                      original_max_position_embeddings=32))),
    "qwen3-yarn-mscale": ("qwen3", dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e6, factor=8.0,
                                                             original_max_position_embeddings=32, beta_fast=16,
                                                             mscale=1.2, mscale_all_dim=0.8))),
    "gemma3-yarn": ("gemma3", dict(rope_parameters=dict(
        full_attention=dict(rope_type="yarn", rope_theta=1e6, factor=4.0, original_max_position_embeddings=32),
        sliding_attention=dict(rope_type="default", rope_theta=1e4)))),
    "llama-longrope": ("llama", dict(rope_parameters=dict(rope_type="longrope", rope_theta=10000.0,
                                                          original_max_position_embeddings=5,
                                                          short_factor=[1.0] * 12,
                                                          long_factor=[1.0 + 0.7 * i for i in range(12)]))),
}
WINDOW_LAYERS = {"mistral-window": (0, 1), "qwen2-window": (1,), "qwen3-window": (0,), "gemma3-window": (0, 2)}


def _randomize_biases(model, out_dir, seed: int) -> None:
    """transformers initialises Linear biases to zero; give each a random value and save the model again."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    model.save_pretrained(out_dir, safe_serialization=True)


@pytest.fixture(scope="module")
def quirk_dirs(tmp_path_factory):
    dirs = {}
    for name, (arch, overrides) in {**BIASED, **WINDOWED, **ROPED}.items():
        path = tmp_path_factory.mktemp(name)
        model = make_model(arch, path, seed=3, **overrides)
        _randomize_biases(model, path, seed=5)      # Qwen2's q/k/v biases too
        dirs[name] = path
    return dirs


@pytest.fixture(params=list(BIASED) + list(WINDOWED) + list(ROPED))
def quirk_dir(request, quirk_dirs):
    return quirk_dirs[request.param]


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


def _reference(model_dir):
    spec = load_model_spec(model_dir)
    state = random_lora_state(spec, LORA, seed=1)
    ids, labels = random_batch(spec.vocab_size, B, T, seed=2)
    return spec, state, ids, labels, loss_and_grads(peft_model(model_dir, LORA, state), ids, labels)


def _assert_matches(logits, loss, grads, ref) -> None:
    np.testing.assert_allclose(logits, ref.logits, atol=1e-4, rtol=0)
    assert loss == pytest.approx(ref.loss, rel=1e-5)
    assert grads.keys() == ref.grads.keys()
    for key, want in ref.grads.items():
        assert rel_err(grads[key], want) < 1e-3, key


@pytest.mark.parametrize("name", list(BIASED))
def test_every_bias_of_the_config_is_loaded_and_matters(quirk_dirs, name):
    """The spec names the biased projections; each bias is non-zero and moves the logits when dropped."""
    import torch
    from transformers import AutoModelForCausalLM

    spec = load_model_spec(quirk_dirs[name])
    want = {"llama-attention-bias": ("q_proj", "k_proj", "v_proj", "o_proj"),
            "llama-mlp-bias": ("gate_proj", "up_proj", "down_proj"),
            "qwen3-attention-bias": ("q_proj", "k_proj", "v_proj", "o_proj")}[name]
    assert spec.bias_targets == want
    model = AutoModelForCausalLM.from_pretrained(quirk_dirs[name], dtype=torch.float32)
    ids = torch.from_numpy(random_batch(spec.vocab_size, 1, T, seed=3)[0].astype(np.int64))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        for target in want:
            bias = model.get_submodule(module_path(spec.layers - 1, target)).bias
            assert bias.abs().min() > 0, target
            saved = bias.clone()
            bias.zero_()
            assert (model(input_ids=ids).logits - full).abs().max() > 1e-3, f"{target} bias changes nothing"
            bias.copy_(saved)


def test_onnx_backend_matches_peft(quirk_dir):
    spec, state, ids, labels, ref = _reference(quirk_dir)
    with OnnxBackend(quirk_dir, LORA, OptimizerConfig(), B, T, init_state=state, threads=1) as be:
        loss, tokens, grads = be.gradients([(ids, labels)])
        logits = be.logits(ids)
    assert tokens == int((labels[:, 1:] != -100).sum())
    _assert_matches(logits, loss, grads, ref)


@pytest.mark.parametrize("name", list(WINDOWED))
def test_onnx_backend_skips_the_keys_before_each_query_blocks_window(quirk_dirs, name):
    """One query block per position (7): a windowed layer's blocks multiply only the keys inside their window
    (from position j − 3 for block j), so the key slices and their gradients' padding are exercised."""
    spec, state, ids, labels, ref = _reference(quirk_dirs[name])
    with OnnxBackend(quirk_dirs[name], LORA, OptimizerConfig(), B, T, init_state=state, threads=1,
                     attention_blocks=T) as be:
        loss, _, grads = be.gradients([(ids, labels)])
        logits = be.logits(ids)
    _assert_matches(logits, loss, grads, ref)


@pytest.mark.gpu
def test_wgpu_backend_matches_peft(quirk_dir, gpu_device):
    from engine.backends.wgpu.backend import WgpuBackend

    spec, state, ids, labels, ref = _reference(quirk_dir)
    with WgpuBackend(quirk_dir, LORA, OptimizerConfig(), B, T, ctx=gpu_device, lora_state=state) as be:
        if spec.mlp_bias:
            assert be.model.layers[0].proj["down_proj"].forward.splits > 1
        logits = be.logits(ids)
        loss, _, grads = be.gradients([(ids, labels)])
    _assert_matches(logits, loss, grads, ref)


@pytest.mark.parametrize("name", list(WINDOWED))
def test_the_window_cuts_keys_at_the_tests_length(quirk_dirs, name):
    """Why the PEFT comparisons above prove the window: transformers' own logits with and without it differ at
    T, and agree up to T = window (a query sees q − window < kv <= q, transformers' sliding_window_overlay)."""
    import torch
    from transformers import AutoModelForCausalLM

    spec = load_model_spec(quirk_dirs[name])
    assert spec.sliding_window == WINDOW < T and spec.window_layers == WINDOW_LAYERS[name]
    windowed = AutoModelForCausalLM.from_pretrained(quirk_dirs[name], dtype=torch.float32,
                                                    attn_implementation="eager")
    # The same layers with a window longer than any sequence here (Gemma 3's sliding layers keep their rope).
    plain = AutoModelForCausalLM.from_pretrained(quirk_dirs[name], dtype=torch.float32,
                                                 attn_implementation="eager", sliding_window=1024)
    ids = torch.from_numpy(random_batch(spec.vocab_size, 1, T, seed=4)[0].astype(np.int64))
    with torch.no_grad():
        inside = (windowed(input_ids=ids[:, :WINDOW]).logits - plain(input_ids=ids[:, :WINDOW]).logits).abs().max()
        beyond = (windowed(input_ids=ids).logits - plain(input_ids=ids).logits).abs().max()
    assert inside == 0
    assert beyond > 1e-3


@pytest.mark.parametrize("name", list(BIASED))
def test_merged_export_keeps_the_biases(quirk_dirs, tmp_path, name):
    """Merging adds B·A to the weights only; the biases travel unchanged and the logits stay PEFT's."""
    import torch

    from engine.export.merged import export_merged
    from bench.peft_adapters import PROBE_TOKENS, load_base, make_adapter, peft_logits

    adapter_dir = make_adapter(quirk_dirs[name], tmp_path / "adapter", seed=5)
    merged = load_base(export_merged(adapter_dir, quirk_dirs[name], tmp_path / "merged").path)
    with torch.no_grad():
        got = merged(torch.tensor([PROBE_TOKENS])).logits[0].numpy()
    np.testing.assert_allclose(got, peft_logits(quirk_dirs[name], adapter_dir), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(ROPED))
def test_rope_scaling_changes_the_model(quirk_dirs, name):
    """The scaled models' own logits differ from the same weights with plain rope: the comparisons above test it."""
    import torch
    from transformers import AutoModelForCausalLM

    spec = load_model_spec(quirk_dirs[name])
    assert spec.rope.scaling_type in ("yarn", "longrope") and spec.rope.attention_factor > 1
    plain_rope = ({"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                   "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}} if name == "gemma3-yarn"
                  else {"rope_type": "default", "rope_theta": spec.rope.theta})
    yarn = AutoModelForCausalLM.from_pretrained(quirk_dirs[name], dtype=torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(quirk_dirs[name], dtype=torch.float32, rope_parameters=plain_rope)
    ids = torch.from_numpy(random_batch(spec.vocab_size, 1, T, seed=4)[0].astype(np.int64))
    with torch.no_grad():
        assert (yarn(input_ids=ids).logits - plain(input_ids=ids).logits).abs().max() > 1e-3
