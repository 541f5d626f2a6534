"""Frozen weights held in 16-bit and block formats: the WGSL engine trains exactly the model PyTorch + PEFT sees
when it is given the same weights dequantized (the oracle runs on a copy of the base holding those values)."""
import numpy as np
import pytest
from safetensors.numpy import save_file

from engine.backends.base import OptimizerConfig
from engine.backends.wgpu.buffers import formats_for
from engine.backends.wgpu.memory import memory_plan
from engine.lora.config import LoraConfig
from engine.model.hf_names import EMBED_WEIGHT, LM_HEAD_WEIGHT
from engine.model.spec import load_model_spec
from engine.model.weight_formats import WeightFormat, dequantize, quantize
from engine.model.weights import open_weights
from tests.oracle import loss_and_grads, peft_model, random_batch, random_lora_state

pytestmark = pytest.mark.gpu

B, T = 2, 7
# Row lengths that whole blocks divide: 64 for the 32-weight formats, 256 for the K-quants (q4 takes Q4_K there).
SHAPES = {"blocks32": dict(hidden_size=64, intermediate_size=96, num_attention_heads=2, num_key_value_heads=1),
          "blocks256": dict(hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                            num_hidden_layers=1)}


@pytest.fixture(scope="module")
def block_models(tmp_path_factory):
    from bench.tiny_models import make_model

    out = {}
    for name, overrides in SHAPES.items():
        arch = "qwen2" if name == "blocks32" else "llama"     # biases and an untied head; a tied head
        folder = tmp_path_factory.mktemp(name)
        make_model(arch, folder, seed=5, **overrides)
        out[name] = folder
    return out


def held_copy(model_dir, choice: str, folder):
    """A copy of the base whose weights are what the GPU holds under `choice`, dequantized (the oracle's base)."""
    source = open_weights(model_dir)
    stored = {n: t.format for n, t in source.stored().items()}
    format_of = formats_for(choice, stored)
    tensors, formats = {}, {}
    for name, tensor in source.stored().items():
        fmt = format_of(name, tensor.shape, name in (EMBED_WEIGHT, LM_HEAD_WEIGHT))
        values = source.f32(name)
        tensors[name] = dequantize(quantize(values, fmt), fmt, values.shape).reshape(values.shape)
        formats[name] = fmt
    folder.mkdir()
    for item in model_dir.iterdir():
        if item.suffix != ".safetensors":
            (folder / item.name).write_bytes(item.read_bytes())
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder, formats


@pytest.mark.parametrize("model,choice,expect", [
    ("blocks32", "bf16", WeightFormat.BF16), ("blocks32", "f16", WeightFormat.F16),
    ("blocks32", "q8", WeightFormat.Q8_0), ("blocks32", "q4", WeightFormat.Q4_1),
    ("blocks256", "q4", WeightFormat.Q4_K)])
def test_every_lora_gradient_matches_peft_on_the_dequantized_weights(block_models, gpu_device, tmp_path, model,
                                                                     choice, expect):
    from engine.backends.wgpu.backend import WgpuBackend

    model_dir = block_models[model]
    base, formats = held_copy(model_dir, choice, tmp_path / "held")
    assert formats["model.layers.0.mlp.down_proj.weight"] == expect
    spec = load_model_spec(model_dir)
    lora = LoraConfig(rank=4, alpha=8)
    state = random_lora_state(spec, lora, seed=3)
    ids, labels = random_batch(spec.vocab_size, B, T, seed=4)
    ref = loss_and_grads(peft_model(base, lora, state), ids, labels)
    optim = OptimizerConfig()
    before = gpu_device.bytes_allocated
    with WgpuBackend(model_dir, lora, optim, B, T, ctx=gpu_device, lora_state=state, weights=choice) as be:
        assert gpu_device.bytes_allocated - before == memory_plan(spec, lora, optim, B, T, weights=choice).total
        assert be.weights.layers[0].down.format == expect
        np.testing.assert_allclose(be.logits(ids), ref.logits, atol=1e-4, rtol=0)
        loss, _, grads = be.gradients([(ids, labels)])
    assert loss == pytest.approx(ref.loss, rel=1e-5)
    for key, want in ref.grads.items():
        err = np.abs(grads[key] - want).max() / max(np.abs(want).max(), 1e-12)
        assert err < 1e-3, f"{key}: relative error {err:.2e}"


def test_smaller_formats_plan_fewer_bytes(block_models):
    spec = load_model_spec(block_models["blocks256"])
    lora, optim = LoraConfig(rank=4, alpha=8), OptimizerConfig()
    sizes = {c: memory_plan(spec, lora, optim, 1, 16, weights=c).weights for c in ("f32", "bf16", "q8", "q4")}
    assert sizes["f32"] > sizes["bf16"] > sizes["q8"] > sizes["q4"]
    # bf16 halves every matrix; norms stay f32, so a little over half.
    assert 0.5 < sizes["bf16"] / sizes["f32"] < 0.52


@pytest.mark.parametrize("choice", ["f32", "bf16", "f16", "q8", "q4"])
@pytest.mark.parametrize("recompute", [False, True])
def test_memory_plan_is_the_allocation_for_every_format_and_recompute(block_models, gpu_device, choice, recompute):
    from engine.backends.wgpu.backend import WgpuBackend

    model_dir = block_models["blocks32"]
    spec = load_model_spec(model_dir)
    lora, optim = LoraConfig(rank=4, alpha=8, dropout=0.1), OptimizerConfig(name="adamw8bit", block_size=64)
    before = gpu_device.bytes_allocated
    with WgpuBackend(model_dir, lora, optim, 3, 5, ctx=gpu_device, weights=choice, recompute=recompute) as be:
        allocated = gpu_device.bytes_allocated - before
        assert be.memory_bytes() == allocated
    plan = memory_plan(spec, lora, optim, 3, 5, gpu_device.max_binding_bytes, gpu_device.max_workgroups,
                       weights=choice, recompute=recompute)
    assert plan.total == allocated
