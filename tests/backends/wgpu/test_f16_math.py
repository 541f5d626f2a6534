"""math f16 (kernels.linear_f16): the projections' and the LM head's frozen products in half precision train
the model PyTorch + PEFT sees with the same 16-bit weights, within stated tolerances measured on lavapipe; LoRA
products and their gradients stay f32. The oracle runs in f32 on a copy of the base holding the f16/bf16
weights' values, so the differences below are the half-precision arithmetic alone (activations rounded to f16,
16-product f16 sums).

Measured on lavapipe (tiny qwen2, B=2, T=7, r=4; f16 / bf16 weights; the projections and the LM head in f16):
logits max |Δ| 6.0e-3 / 6.9e-3 (logits up to ±3.05), loss relative 1.2e-4 / 5.8e-5, LoRA gradients' worst
relative error 5.2e-3 / 5.9e-3 (a tensor's max |Δ| / its max |g|). The same runs with math f32 measure 1.5e-6,
8e-8 and 1.4e-6. The bounds assert 2.2-2.5× the f16 figures.
"""
import numpy as np
import pytest
from safetensors.numpy import save_file

from engine.backends.base import OptimizerConfig
from engine.backends.wgpu.memory import memory_plan
from engine.lora.config import LoraConfig
from engine.model.spec import load_model_spec
from engine.model.weight_formats import WeightFormat, dequantize, quantize
from engine.model.weights import open_weights
from tests.oracle import loss_and_grads, peft_model, random_batch, random_lora_state

pytestmark = pytest.mark.gpu

B, T = 2, 7
LOGITS_ATOL, LOSS_RTOL, GRAD_RTOL = 1.5e-2, 2.5e-4, 1.5e-2
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from bench.tiny_models import make_model

    folder = tmp_path_factory.mktemp("qwen2")
    make_model("qwen2", folder, seed=5, hidden_size=64, intermediate_size=96, num_attention_heads=2,
               num_key_value_heads=1)       # biases on q/k/v, an untied head
    return folder


def f16_ctx(ctx):
    if not ctx.has_f16:
        pytest.skip(f"{ctx.label} has no shader-f16")
    return ctx


def held_copy(model_dir, fmt: WeightFormat, folder, edit=None):
    """A copy of the base with every matrix rounded to `fmt`: what the GPU holds under weights f16/bf16 (norms
    and biases are held f32, so they stay as they are)."""
    source = open_weights(model_dir)
    tensors = {}
    for name in source.stored():
        values = source.f32(name)
        if edit:
            values = edit(name, values)
        if values.ndim == 2:
            values = dequantize(quantize(values, fmt), fmt, values.shape).reshape(values.shape)
        tensors[name] = values
    folder.mkdir()
    for item in model_dir.iterdir():
        if item.suffix != ".safetensors":
            (folder / item.name).write_bytes(item.read_bytes())
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("choice", ["f16", "bf16"])
def test_f16_math_matches_peft_within_the_stated_tolerance(model_dir, gpu_device, tmp_path, choice):
    from engine.backends.wgpu.backend import WgpuBackend

    ctx = f16_ctx(gpu_device)
    base = held_copy(model_dir, WeightFormat.parse(choice), tmp_path / "held")
    spec = load_model_spec(model_dir)
    lora = LoraConfig(rank=4, alpha=8)
    state = random_lora_state(spec, lora, seed=3)
    ids, labels = random_batch(spec.vocab_size, B, T, seed=4)
    ref = loss_and_grads(peft_model(base, lora, state), ids, labels)
    with WgpuBackend(model_dir, lora, OptimizerConfig(), B, T, ctx=ctx, lora_state=state, weights=choice,
                     math="f16") as be:
        assert len(be.f16_products()) == 7 * spec.layers + 1 and be.f16_products()[-1] == "lm_head"
        logits = be.logits(ids)
        loss, _, grads = be.gradients([(ids, labels)])
    assert np.abs(logits - ref.logits).max() < LOGITS_ATOL
    assert loss == pytest.approx(ref.loss, rel=LOSS_RTOL)
    for key, want in ref.grads.items():
        err = np.abs(grads[key] - want).max() / max(np.abs(want).max(), 1e-12)
        assert err < GRAD_RTOL, f"{key}: relative error {err:.2e}"


@pytest.mark.parametrize("recompute", [False, True])
def test_memory_plan_is_the_allocation_with_f16_math(model_dir, gpu_device, recompute):
    from engine.backends.wgpu.backend import WgpuBackend

    ctx = f16_ctx(gpu_device)
    spec = load_model_spec(model_dir)
    lora, optim = LoraConfig(rank=4, alpha=8), OptimizerConfig()
    before = ctx.bytes_allocated
    with WgpuBackend(model_dir, lora, optim, 3, 5, ctx=ctx, weights="bf16", recompute=recompute, math="f16") as be:
        allocated = ctx.bytes_allocated - before
        assert be.memory_bytes() == allocated
    plan = memory_plan(spec, lora, optim, 3, 5, ctx.max_binding_bytes, ctx.max_workgroups, weights="bf16",
                       recompute=recompute)
    assert plan.total == allocated


def test_a_weight_beyond_f16_range_keeps_f32_math(model_dir, gpu_device, tmp_path):
    """A bf16 weight holding 1e5 (beyond f16's 65504, and the limit of 15) is multiplied in f32, the others in
    f16, and the loss matches PEFT's. Such a weight makes activations with a ~1e4 outlier, and f16 math's error
    is relative to the largest product of a 16-step sum: measured here, the LoRA gradients' worst relative error
    grows to 3.1e-2 (0.55 with the outlier in layer 0's up_proj instead) where f32 math gives 1e-6. That is the
    cost of f16 math with activation outliers; this test checks the weight's fallback, not those gradients."""
    from engine.backends.wgpu.backend import WgpuBackend

    ctx = f16_ctx(gpu_device)
    big = "model.layers.1.mlp.down_proj.weight"

    def edit(name, values):
        if name == big:
            values = values.copy()
            values[3, 5] = 1e5
        return values

    base = held_copy(model_dir, WeightFormat.BF16, tmp_path / "held", edit)
    spec = load_model_spec(base)
    lora = LoraConfig(rank=4, alpha=8)
    state = random_lora_state(spec, lora, seed=3)
    ids, labels = random_batch(spec.vocab_size, B, T, seed=4)
    ref = loss_and_grads(peft_model(base, lora, state), ids, labels)
    with WgpuBackend(base, lora, OptimizerConfig(), B, T, ctx=ctx, lora_state=state, weights="bf16",
                     math="f16") as be:
        assert be.weights.layers[1].down.abs_max == 99840.0       # 1e5 in bf16
        assert "layers.1.down_proj" not in be.f16_products() and len(be.f16_products()) == 7 * spec.layers
        loss, _, grads = be.gradients([(ids, labels)])
    assert loss == pytest.approx(ref.loss, rel=LOSS_RTOL)
    assert all(np.isfinite(g).all() for g in grads.values())


def test_f16_math_refuses_f32_weights_and_unknown_math(model_dir, gpu_device):
    from engine.backends.base import MemoryOptions
    from engine.backends.wgpu.backend import WgpuBackend

    ctx = f16_ctx(gpu_device)
    with pytest.raises(ValueError, match="no projection weight it may multiply in f16"):
        WgpuBackend(model_dir, LoraConfig(rank=4, alpha=8), OptimizerConfig(), 1, 4, ctx=ctx, weights="f32",
                    math="f16")
    with pytest.raises(ValueError, match="math 'f8' is unknown; choose from f32, f16"):
        MemoryOptions(math="f8")
