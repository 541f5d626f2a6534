"""The memory plan equals what the engine allocates, and it scales the way the sizing function says."""
import pytest

from engine.backends.base import OptimizerConfig
from engine.lora.config import LoraConfig
from engine.backends.wgpu.microbench import random_weights, smollm2_135m_spec, tiny_spec
from engine.model.spec import load_model_spec
from engine.backends.wgpu.memory import memory_plan
from engine.backends.wgpu.kernels.lm_head import LOGITS_BUDGET_BYTES

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("optim", ["adamw", "adamw8bit", "sgd"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_plan_equals_allocated_bytes(tiny_model_dir, gpu_device, optim, dropout, recompute):
    from engine.backends.wgpu.backend import WgpuBackend
    spec = load_model_spec(tiny_model_dir)
    lora = LoraConfig(rank=3, alpha=6, dropout=dropout, targets=("q_proj", "o_proj", "up_proj"))
    config = OptimizerConfig(name=optim)
    before = gpu_device.bytes_allocated
    with WgpuBackend(tiny_model_dir, lora, config, 2, 5, ctx=gpu_device, recompute=recompute) as backend:
        allocated = gpu_device.bytes_allocated - before
        plan = memory_plan(spec, lora, config, 2, 5, gpu_device.max_binding_bytes, gpu_device.max_workgroups,
                           recompute=recompute)
        assert backend.memory_bytes() == allocated == plan.total, plan.as_dict()
    assert gpu_device.bytes_allocated == before, "close() gives the bytes back"


# tiny_spec() variants: Llama as it is, Qwen3-like (q/k norms, head_dim 24 != hidden/heads), Qwen2-like (biases).
VARIANTS = {"llama": {}, "qwen3": dict(model_type="qwen3", qk_norm=True, head_dim=24),
            "qwen2": dict(model_type="qwen2", qkv_bias=True, tied_embeddings=False)}


@pytest.mark.parametrize("recompute", [False, True])
def test_plan_equals_allocated_bytes_with_grouped_lora(gpu_device, recompute):
    """Every target and no dropout: q/k/v and gate/up run as LoraGroups (wider u and du, stacked dA split K)."""
    import dataclasses

    from engine.backends.wgpu.backend import WgpuBackend
    from engine.backends.wgpu.buffers import lora_groups
    spec = dataclasses.replace(tiny_spec(), layers=3, **VARIANTS["qwen3"])
    lora = LoraConfig(rank=5, alpha=10)
    assert set(lora_groups(lora)) == {"qkv", "gate_up"}
    before = gpu_device.bytes_allocated
    with WgpuBackend(spec, lora, OptimizerConfig(), 3, 13, ctx=gpu_device, tensors=random_weights(spec),
                     recompute=recompute) as backend:
        assert all(set(k.lora_groups) == {"qkv", "gate_up"} for k in backend.model.layers)
        plan = memory_plan(spec, lora, OptimizerConfig(), 3, 13, gpu_device.max_binding_bytes,
                           gpu_device.max_workgroups, recompute=recompute)
        assert backend.memory_bytes() == gpu_device.bytes_allocated - before == plan.total, plan.as_dict()


@pytest.mark.parametrize("dropout, targets, grouped", [
    (0.0, None, {"qkv": 3, "gate_up": 2}), (0.1, None, {}), (0.0, ("q_proj", "k_proj", "up_proj"), {}),
    (0.0, ("gate_proj", "up_proj", "o_proj"), {"gate_up": 2})])
def test_lora_layout_stacks_group_a_tensors(dropout, targets, grouped):
    """A group's A tensors lie back to back (one [n·r, in] binding); everything else starts aligned; no two
    tensors overlap; the keys keep PEFT's order."""
    from itertools import pairwise

    import numpy as np

    from engine.backends.wgpu.buffers import LORA_ALIGN, LORA_GROUPS, lora_groups, lora_layout
    from engine.lora.config import lora_shapes, peft_key
    spec = tiny_spec()
    lora = LoraConfig(rank=3, alpha=6, dropout=dropout, **({"targets": targets} if targets else {}))
    assert {name: len(t) for name, t in lora_groups(lora).items()} == grouped
    layout = lora_layout(spec, lora)
    assert list(layout.offsets) == list(lora_shapes(spec, lora))
    stacked = set()
    for layer in range(spec.layers):
        for name in grouped:
            keys = [peft_key(layer, t, "A") for t in LORA_GROUPS[name]]
            _, offset, size = layout.stacked_binding("buf", keys)
            assert size == 4 * len(keys) * 3 * spec.hidden and offset % (4 * LORA_ALIGN) == 0
            stacked.update(keys[1:])
    assert all(o % LORA_ALIGN == 0 for k, o in layout.offsets.items() if k not in stacked)
    spans = sorted((o, o + int(np.prod(layout.shapes[k]))) for k, o in layout.offsets.items())
    assert all(end <= start for (_, end), (start, _) in pairwise(spans)) and spans[-1][1] <= layout.total
    if not grouped:
        with pytest.raises(ValueError, match="not stacked"):
            layout.stacked_binding("buf", [peft_key(0, t, "A") for t in lora.targets[:2]])


def test_move_flat_between_grouped_and_saved_layouts():
    """Optimizer moments move tensor by tensor between the grouped and the saved (ungrouped) layout and back;
    block-quantised state moves only where every tensor starts on a whole block in both, else it refuses."""
    import numpy as np

    from engine.backends.wgpu.buffers import lora_layout, move_flat
    spec, lora = tiny_spec(), LoraConfig(rank=3, alpha=6)
    grouped, saved = lora_layout(spec, lora), lora_layout(spec, lora, grouped=False)
    assert grouped.offsets != saved.offsets
    flat = np.zeros(saved.total, np.float32)
    for i, (key, at) in enumerate(saved.offsets.items()):
        flat[at:at + int(np.prod(saved.shapes[key]))] = i + 1
    there = move_flat(flat, saved, grouped)
    for i, (key, at) in enumerate(grouped.offsets.items()):
        assert (there[at:at + int(np.prod(grouped.shapes[key]))] == i + 1).all()
    np.testing.assert_array_equal(move_flat(there, grouped, saved), flat)
    with pytest.raises(ValueError, match="whole block of 256"):
        move_flat(np.zeros(-(-saved.total // 256), np.float32), saved, grouped, 256)


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("arch, layers, B, T", [("llama", 1, 1, 1), ("qwen3", 3, 3, 13), ("qwen2", 4, 1, 37)])
def test_plan_equals_allocated_bytes_at_other_shapes(gpu_device, arch, layers, B, T, recompute):
    """Other layer counts and odd [B, T] (random weights, every target, dropout): the plan equals the allocation."""
    import dataclasses
    from engine.backends.wgpu.backend import WgpuBackend
    spec = dataclasses.replace(tiny_spec(), layers=layers, **VARIANTS[arch])
    lora = LoraConfig(rank=5, alpha=10, dropout=0.1)
    before = gpu_device.bytes_allocated
    with WgpuBackend(spec, lora, OptimizerConfig(), B, T, ctx=gpu_device, tensors=random_weights(spec),
                     recompute=recompute) as backend:
        plan = memory_plan(spec, lora, OptimizerConfig(), B, T, gpu_device.max_binding_bytes,
                           gpu_device.max_workgroups, recompute=recompute)
        assert backend.memory_bytes() == gpu_device.bytes_allocated - before == plan.total, plan.as_dict()


def test_recompute_keeps_one_row_block_per_layer():
    """With recompute each further layer costs one [B·T, C] of activations (its output); without, a whole set.
    At SmolLM2-135M's shape, B=8, T=512, that takes the activations from over 7x the weights to under them."""
    import dataclasses
    spec, lora, optim = smollm2_135m_spec(), LoraConfig(rank=16, alpha=32), OptimizerConfig()
    deeper = dataclasses.replace(spec, layers=spec.layers + 1)
    on = memory_plan(spec, lora, optim, 8, 512, recompute=True)
    assert memory_plan(deeper, lora, optim, 8, 512, recompute=True).activations - on.activations == 4 * 8 * 512 * 576
    off = memory_plan(spec, lora, optim, 8, 512)
    assert memory_plan(deeper, lora, optim, 8, 512).activations - off.activations == off.activations // spec.layers
    assert dataclasses.replace(on, activations=off.activations) == off, "recompute changes only the activations"
    assert off.activations > 7 * off.weights and on.activations < off.weights


@pytest.mark.parametrize("tied", [True, False])
def test_binding_limit_splits_the_vocabulary(gpu_device, tied):
    """A small binding limit splits the embedding/LM head into pieces: same logits, and the plan still holds."""
    import dataclasses
    import numpy as np
    from engine.backends.wgpu.backend import WgpuBackend
    spec = dataclasses.replace(tiny_spec(), tied_embeddings=tied)
    lora = LoraConfig(rank=2, alpha=4)
    tensors = random_weights(spec, std=0.2)
    ids = np.array([[0, 250, 450, 511]], np.int32)
    with WgpuBackend(spec, lora, OptimizerConfig(), 1, 4, ctx=gpu_device, tensors=tensors) as whole:
        assert len(whole.weights.embed) == 1
        want = whole.logits(ids)
    limit = 4 * spec.hidden * 200          # 200 rows per piece: 512 tokens → 3 pieces
    before = gpu_device.bytes_allocated
    with WgpuBackend(spec, lora, OptimizerConfig(), 1, 4, ctx=gpu_device, tensors=tensors,
                     max_binding_bytes=limit) as split:
        assert len(split.weights.embed) == len(split.weights.lm_head) == 3
        assert (split.weights.lm_head is split.weights.embed) == tied
        plan = memory_plan(spec, lora, OptimizerConfig(), 1, 4, limit, gpu_device.max_workgroups)
        assert gpu_device.bytes_allocated - before == plan.total
        np.testing.assert_allclose(split.logits(ids), want, rtol=1e-5, atol=1e-5)


def test_smollm2_plan_is_plausible():
    """SmolLM2-135M at B=8, T=512: weights ≈ 135M floats; activations dominate; the logits stay one chunk."""
    spec = smollm2_135m_spec()
    plan = memory_plan(spec, LoraConfig(rank=16, alpha=32), OptimizerConfig(), 8, 512, 128 << 20)
    assert 0.5e9 < plan.weights < 0.6e9
    assert plan.activations > plan.weights
    assert plan.logits <= min(LOGITS_BUDGET_BYTES, 128 << 20) and plan.logits < plan.activations / 20
    assert plan.adapter == 2 * 4 * LoraConfig(rank=16).trainable_parameters(spec)
