"""Phi-3 and Phi-4-mini (Phi3ForCausalLM): the spec as transformers builds the model, each quirk tested, the refused
options, and the adapter through PEFT, chat and the merged export. The PEFT comparisons on both training backends
(kept and recomputed activations) are test_architectures.py's; the GGUF LoRA export is test_gguf.py's.

The tiny Phi-3 (bench/tiny_models.py) has random norms, fused qkv_proj / gate_up_proj and a sliding window (4)
shorter than the test sequences (7); the tiny Phi-4-mini rotates 18 of each head's 24 dims (partial_rotary_factor
0.75) with longrope, past its original length (5), so its long factors and attention factor apply.
"""
import dataclasses
import json

import numpy as np
import pytest

from engine.lora.config import LoraConfig, fit_targets, lora_shapes
from engine.model.spec import UnsupportedModelError, load_model_spec
from tests.arch_helpers import (FUSED_LORAS, T, assert_adapter_round_trip, config_dir, cpu_logits_with_spec,
                                reference, rel_err)
from tests.oracle import random_batch, random_lora_state


def test_spec_reads_phi3_as_transformers_builds_it(tiny_phi3_dir, tiny_phi4mini_dir):
    import torch
    from transformers import AutoModelForCausalLM

    phi3, phi4 = load_model_spec(tiny_phi3_dir), load_model_spec(tiny_phi4mini_dir)
    assert (phi3.fused, phi3.rotary_dim, phi3.rope_dim, phi3.sliding_window, phi3.window_layers) == (
        True, None, 24, 4, (0, 1))
    assert (phi4.rotary_dim, phi4.rope_dim, phi4.tied_embeddings, phi4.sliding_window) == (18, 18, True, None)
    assert phi3.lora_targets == ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    for spec, folder in ((phi3, tiny_phi3_dir), (phi4, tiny_phi4mini_dir)):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        assert spec.parameter_count() == sum(p.numel() for p in model.parameters())
        attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
        assert spec.projection_shape("qkv_proj") == tuple(attn.qkv_proj.weight.shape)
        assert spec.projection_shape("gate_up_proj") == tuple(mlp.gate_up_proj.weight.shape)
        rotary = model.model.rotary_emb
        assert rotary.inv_freq.shape == (spec.rope_dim // 2,)
        assert spec.rope.attention_factor == pytest.approx(rotary.attention_scaling, rel=1e-12)
    # transformers' longrope frequencies for a sequence past the original length (the long factors) are ours.
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    model = AutoModelForCausalLM.from_pretrained(tiny_phi4mini_dir, dtype=torch.float32)
    long, _ = ROPE_INIT_FUNCTIONS["longrope"](model.config, "cpu", seq_len=T)
    np.testing.assert_allclose(phi4.rope.inv_freq(phi4.rope_dim, T), long.numpy(), rtol=2e-7)   # f32 pow: 1 ulp
    assert phi4.rope.original_max_position == 5 < T


def test_fused_weights_are_split_into_their_members(tiny_phi3_dir):
    """q, k, v are qkv_proj's row blocks in that order, gate and up gate_up_proj's halves (Phi3MLP's chunk(2))."""
    from engine.model.weights import load_weights, open_weights, split_fused

    spec, source = load_model_spec(tiny_phi3_dir), open_weights(tiny_phi3_dir)
    fused = load_weights(tiny_phi3_dir)
    assert "model.layers.0.self_attn.q_proj.weight" not in fused       # stored tensors only
    qkv, gate_up = fused["model.layers.1.self_attn.qkv_proj.weight"], fused["model.layers.1.mlp.gate_up_proj.weight"]
    q, kv = spec.q_dim, spec.kv_dim
    np.testing.assert_array_equal(source.f32("model.layers.1.self_attn.q_proj.weight"), qkv[:q])
    np.testing.assert_array_equal(source.f32("model.layers.1.self_attn.k_proj.weight"), qkv[q:q + kv])
    np.testing.assert_array_equal(source.f32("model.layers.1.self_attn.v_proj.weight"), qkv[q + kv:])
    np.testing.assert_array_equal(source.f32("model.layers.1.mlp.gate_proj.weight"), gate_up[:spec.intermediate])
    np.testing.assert_array_equal(source.f32("model.layers.1.mlp.up_proj.weight"), gate_up[spec.intermediate:])
    assert split_fused(source) is source        # what open_weights split is not wrapped again (as the backends ask)


def test_each_quirk_moves_the_logits(tiny_phi3_dir, tiny_phi4mini_dir):
    """The CPU backend with one quirk of the spec turned off is far from transformers: the window (Phi-3), the
    partial rotary and longrope's long factors (Phi-4-mini)."""
    for folder, plain in ((tiny_phi3_dir, {"window_layers": ()}), (tiny_phi4mini_dir, {"rotary_dim": None})):
        lora = FUSED_LORAS["all-targets"]
        state, ids, _, ref = reference(folder, lora)
        spec = load_model_spec(folder)
        for field, value in plain.items():
            changed = dataclasses.replace(spec, **{field: value})
            if field == "rotary_dim":    # the whole head rotating needs factors for all its pairs
                rope = dataclasses.replace(spec.rope, short_factor=spec.rope.short_factor + (1.0,) * 3,
                                           long_factor=spec.rope.long_factor + (1.0,) * 3)
                changed = dataclasses.replace(changed, rope=rope)
            logits = cpu_logits_with_spec(folder, changed, lora, state, ids)
            assert np.abs(logits - ref.logits).max() > 1e-2, field
        short = dataclasses.replace(spec.rope, long_factor=spec.rope.short_factor)
        if spec.rope.scaling_type == "longrope":
            logits = cpu_logits_with_spec(folder, dataclasses.replace(spec, rope=short), lora, state, ids)
            assert np.abs(logits - ref.logits).max() > 1e-2, "long factors"


def test_targets_name_the_fused_projections(tiny_phi3_dir, tiny_model_dirs):
    """The default targets (the seven projections) mean Phi-3's four; a member alone, or a fused name on a model
    without them, is refused naming what to use; the LoRA shapes are PEFT's (one A, B over all members)."""
    spec = load_model_spec(tiny_phi3_dir)
    assert fit_targets(spec, LoraConfig()).targets == spec.lora_targets
    assert fit_targets(spec, LoraConfig(targets=("q_proj", "k_proj", "v_proj", "down_proj"))).targets == (
        "qkv_proj", "down_proj")
    with pytest.raises(ValueError, match="adapt all of them \\(target qkv_proj\\) or none, not q_proj alone"):
        fit_targets(spec, LoraConfig(targets=("q_proj", "o_proj")))
    llama = load_model_spec(tiny_model_dirs["llama"])
    with pytest.raises(ValueError, match="llama has no projection gate_up_proj"):
        fit_targets(llama, LoraConfig(targets=("gate_up_proj",)))
    shapes = lora_shapes(spec, LoraConfig(rank=3))
    assert shapes["base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight"] == (3, 72)
    assert shapes["base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight"] == (120, 3)
    assert shapes["base_model.model.model.layers.1.mlp.gate_up_proj.lora_B.weight"] == (200, 3)
    assert LoraConfig(rank=3).trainable_parameters(spec) == 2 * 3 * (72 + 120 + 72 + 72 + 72 + 200 + 100 + 72)


def test_lora_dropout_on_a_fused_projection_is_one_mask_as_peft(tiny_phi3_dir):
    """The CPU train graph with its dropout masks as outputs: one mask per fused module (PEFT's one Dropout on
    qkv_proj's input serves q, k and v), and PEFT with those masks gives the same loss and gradients."""
    from engine.backends.onnx.model_graph import grad_name
    from tests.backends.onnx.test_backend import dropout_against_peft

    lora = LoraConfig(rank=4, alpha=8, dropout=0.25, targets=FUSED_LORAS["all-targets"].targets)
    out, want, masks, tokens = dropout_against_peft(tiny_phi3_dir, lora)
    assert len({m.tobytes() for m in masks}) == len(masks) == 2 * 4
    assert abs(float(out["loss_sum"]) / tokens - want.loss) <= 1e-5 * want.loss
    for key, grad in want.grads.items():
        assert rel_err(out[grad_name(key)] / tokens, grad) < 1e-3, key


def test_adapter_loads_back_in_peft_and_chat_with_the_same_numbers(tiny_phi4mini_dir, tmp_path):
    """The CPU backend's qkv_proj / gate_up_proj adapter as PEFT files: PEFT's loss is the backend's; chat
    (transformers + PEFT) gives PEFT's logits; the merged folder (folded into the fused weights) gives them
    without PEFT."""
    assert_adapter_round_trip(tiny_phi4mini_dir, tmp_path)


def test_a_peft_adapter_is_read_for_training_with_its_names(tiny_phi3_dir, tmp_path):
    """An adapter PEFT wrote for Phi-3 (target_modules all-linear) imports as the fused targets, tensors intact."""
    from bench.peft_adapters import make_adapter
    from engine.lora.peft_read import import_adapter, read_adapter_tensors

    folder = make_adapter(tiny_phi3_dir, tmp_path / "adapter", seed=2, target_modules="all-linear")
    lora, state, _ = import_adapter(folder, load_model_spec(tiny_phi3_dir))
    assert lora.targets == ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    stored = read_adapter_tensors(folder)
    assert state.keys() == stored.keys()
    for key, value in stored.items():
        np.testing.assert_array_equal(state[key], value)


def test_phi3_defaults_are_transformers_defaults(tmp_path):
    """What config.json leaves out is Phi3Config's (rms_norm_eps 1e-5, no window, 4096 positions); "su" and
    "yarn" rope types mean longrope; a top-level original_max_position_embeddings wins over the rope dict's."""
    from transformers import AutoConfig

    factors = [1.0, 1.5, 2.0, 2.5]
    cases = [({"type": "su", "original_max_position_embeddings": 2048}, {}, 2048),
             ({"type": "yarn", "original_max_position_embeddings": 2048}, {"original_max_position_embeddings": 1024},
              1024)]
    for i, (rope, top, original) in enumerate(cases):
        folder = config_dir(tmp_path, f"m{i}", model_type="phi3", **top, rope_scaling={
            **rope, "short_factor": factors, "long_factor": factors})
        config = json.loads((folder / "config.json").read_text())
        del config["head_dim"], config["max_position_embeddings"]
        (folder / "config.json").write_text(json.dumps(config))
        spec = load_model_spec(folder)
        hf = AutoConfig.from_pretrained(folder)
        assert spec.rms_eps == hf.rms_norm_eps == 1e-5 and spec.sliding_window is hf.sliding_window is None
        assert spec.max_positions == hf.max_position_embeddings == 4096
        assert spec.rope.scaling_type == hf.rope_parameters["rope_type"] == "longrope"
        assert spec.rope.original_max_position == hf.rope_parameters["original_max_position_embeddings"] == original


@pytest.mark.parametrize("config, message", [
    (dict(resid_pdrop=0.1), r"resid_pdrop is 0.1: Phi-3's dropout in training mode is not implemented"),
    (dict(attention_dropout=0.05), r"attention_dropout is 0.05"),
    (dict(head_dim=6), r"a Phi-3 head_dim of 6 .*hidden_size / num_attention_heads wide"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), r"Phi-3 rope type 'linear' is unsupported"),
    (dict(partial_rotary_factor=0.1), r"partial_rotary_factor 0.1 gives 0 rotary dims of a 8-dim head"),
    (dict(partial_rotary_factor=0.5, rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 4,
                                                   "long_factor": [1.0] * 4}),
     r"longrope short_factor must be 2 positive numbers \(one per rotary pair of head_dim 4\)"),
], ids=["resid-dropout", "attention-dropout", "head-dim", "linear-rope", "no-rotary",
        "factors-for-the-whole-head"])
def test_what_phi3_does_not_compute_is_refused_by_name(tmp_path, config, message):
    base = dict(model_type="phi3", hidden_size=16, num_attention_heads=2, head_dim=8)
    folder = config_dir(tmp_path, "m", **{**base, **config})
    with pytest.raises(UnsupportedModelError, match=message):
        load_model_spec(folder)


@pytest.mark.gpu
def test_wgsl_lora_dropout_on_fused_projections_trains_and_evaluation_ignores_it(tiny_phi3_dir, gpu_device):
    """The WGSL backend with dropout on qkv_proj and gate_up_proj (FusedLoraBranch's one mask; the mask's own
    exactness is tests/backends/wgpu/kernels/test_lora.py's): evaluation equals the dropout-free adapter's, steps
    train, and the memory plan is what it allocates."""
    from engine.backends.base import OptimizerConfig
    from engine.backends.wgpu.backend import WgpuBackend
    from engine.backends.wgpu.memory import memory_plan

    spec = load_model_spec(tiny_phi3_dir)
    plain = FUSED_LORAS["all-targets"]
    lora = dataclasses.replace(plain, dropout=0.3)
    state = random_lora_state(spec, lora, seed=5)
    batch = random_batch(spec.vocab_size, 2, T, seed=6)
    with WgpuBackend(tiny_phi3_dir, plain, OptimizerConfig(), 2, T, ctx=gpu_device, lora_state=state) as ref:
        want = ref.eval_loss(*batch)
    before = gpu_device.bytes_allocated
    with WgpuBackend(tiny_phi3_dir, lora, OptimizerConfig(), 2, T, ctx=gpu_device, lora_state=state) as be:
        assert gpu_device.bytes_allocated - before == memory_plan(
            spec, lora, OptimizerConfig(), 2, T, gpu_device.max_binding_bytes, gpu_device.max_workgroups).total
        assert be.eval_loss(*batch) == pytest.approx(want, rel=1e-6)
        losses = [be.train_step([batch], lr=1e-2, max_grad_norm=1.0).result().loss for _ in range(6)]
        assert be.eval_loss(*batch)[0] < want[0]
    assert np.isfinite(losses).all()


def test_a_quantized_gguf_phi3_base_splits_its_fused_blocks_by_rows(tmp_path):
    """A Q8_0 GGUF Phi-3 (llama.cpp's attn_qkv and ffn_up, which transformers' loader names qkv_proj and
    gate_up_proj): the members are whole rows of blocks, so the CPU backend's logits equal transformers' own GGUF
    load of the file."""
    import torch
    from transformers import AutoModelForCausalLM

    from bench.gguf_base import write_gguf_base
    from bench.tiny_models import make_model
    from engine.backends.base import OptimizerConfig
    from engine.backends.onnx import OnnxBackend
    from engine.model.references import convert_gguf
    from engine.model.weight_formats import WeightFormat
    from engine.model.weights import open_weights

    make_model("phi3", tmp_path / "hf", hidden_size=96, intermediate_size=160)   # rows of whole 32-blocks
    path = write_gguf_base(tmp_path / "hf", tmp_path / "phi3.gguf", ("q8_0",))
    folder = convert_gguf(path, tmp_path / "folder")
    stored = open_weights(folder).stored()
    assert stored["model.layers.1.self_attn.k_proj.weight"].format == WeightFormat.Q8_0
    assert stored["model.layers.1.self_attn.k_proj.weight"].shape == (32, 96)
    spec = load_model_spec(folder)
    ids, _ = random_batch(spec.vocab_size, 2, T, seed=1)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        want = model(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    with OnnxBackend(folder, LoraConfig(rank=2, alpha=4), OptimizerConfig(), 2, T, threads=1) as be:
        np.testing.assert_allclose(be.logits(ids), want, atol=1e-4, rtol=0)
    # Merged into the dequantized GGUF: the fused tensors are written (updated), never their split views.
    from safetensors import safe_open

    from bench.peft_adapters import make_adapter
    from engine.export.merged import export_merged

    adapter = make_adapter(tmp_path / "hf", tmp_path / "adapter", seed=4, target_modules=["qkv_proj", "gate_up_proj"])
    result = export_merged(adapter, folder, tmp_path / "merged")
    names = set()
    for shard in result.shards:
        with safe_open(result.path / shard, framework="np") as handle:
            names.update(handle.keys())
    assert result.n_merged == 2 * spec.layers
    assert names == {n for n in stored if n not in open_weights(folder).views}


def test_phi4_mini_and_phi3_5_mini_configs_read_as_transformers_reads_them(tmp_path):
    """Config-only folders with the published shapes (Phi-4-mini: 24 heads of 128, 96 of them rotary, longrope
    factors per rotary pair, tied; Phi-3.5-mini: 32 heads of 96, all rotary): the spec's rotary dims, its short
    and long inverse frequencies either side of the original length, and the attention factor are transformers'."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    shapes = {"phi4mini": dict(hidden_size=3072, num_attention_heads=24, num_key_value_heads=8,
                               partial_rotary_factor=0.75, tie_word_embeddings=True, sliding_window=262144),
              "phi3_5mini": dict(hidden_size=3072, num_attention_heads=32, num_key_value_heads=32,
                                 tie_word_embeddings=False, sliding_window=262144)}
    for name, shape in shapes.items():
        pairs = int(shape["hidden_size"] // shape["num_attention_heads"] * shape.get("partial_rotary_factor", 1)) // 2
        rope = {"type": "longrope", "short_factor": [1.0 + 0.01 * i for i in range(pairs)],
                "long_factor": [1.0 + 0.9 * i for i in range(pairs)]}
        folder = config_dir(tmp_path, name, model_type="phi3", vocab_size=200064, intermediate_size=8192,
                            num_hidden_layers=32, max_position_embeddings=131072,
                            original_max_position_embeddings=4096, rope_theta=10000.0, rope_scaling=rope, **shape)
        config = json.loads((folder / "config.json").read_text())
        del config["head_dim"]
        (folder / "config.json").write_text(json.dumps(config))
        spec, hf = load_model_spec(folder), AutoConfig.from_pretrained(folder)
        assert spec.rope_dim == 2 * pairs and spec.window_layers == tuple(range(32))
        for seq in (4096, 4097):
            want, factor = ROPE_INIT_FUNCTIONS["longrope"](hf, "cpu", seq_len=seq)
            np.testing.assert_allclose(spec.rope.inv_freq(spec.rope_dim, seq), want.numpy(), rtol=2e-7)
            assert spec.rope.attention_factor == pytest.approx(factor, rel=1e-12)
