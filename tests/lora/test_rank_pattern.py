"""Plain LoRA adapters with per-module ranks (what an adaptive-rank run folds to): rank_pattern, and exclude_modules
for a projection pruned to rank 0, as PEFT 0.21.2 builds and loads them. Every consumer is checked against PEFT:
our reader, our writer, the merged and GGUF exports, evaluation; training from one is refused by name."""
from __future__ import annotations

import json

import numpy as np
import pytest

from bench.peft_adapters import PROBE_TOKENS, load_base, make_adapter, peft_logits, quiet_peft
from engine.lora.adalora import AdaLoraSettings
from engine.lora.config import LoraConfig
from engine.lora.peft_read import AdapterError, import_adapter, inference_state, read_adapter
from engine.lora.peft_write import export_adapter, rank_pattern_of
from engine.model.spec import load_model_spec

# Odd ranks in both layers, one projection with no adapter at all (every triplet pruned).
RANKS = {"model.layers.0.self_attn.q_proj": 1, "model.layers.0.mlp.up_proj": 3, "model.layers.1.mlp.down_proj": 6,
         "model.layers.1.self_attn.k_proj": 2}
EXCLUDED = "model.layers.1.self_attn.v_proj"


@pytest.fixture(scope="module")
def peft_adapter(tiny_llama_dir, tmp_path_factory):
    """Made by PEFT itself: LoraConfig(r=4, rank_pattern=RANKS, exclude_modules=[EXCLUDED]), random B."""
    return make_adapter(tiny_llama_dir, tmp_path_factory.mktemp("ranks") / "adapter", seed=3, r=4, lora_alpha=8,
                        rank_pattern=RANKS, exclude_modules=[EXCLUDED])


def _peft_layers(base_dir, adapter_dir) -> dict:
    from peft import PeftModel

    with quiet_peft():
        model = PeftModel.from_pretrained(load_base(base_dir), adapter_dir)
    return {name.removeprefix("base_model.model."): module for name, module in model.named_modules()
            if hasattr(module, "lora_A") and "default" in module.lora_A}


def _rank_pattern(adapter) -> dict[str, int]:
    ranks = {m.name: m.rank for m in adapter.modules}
    return {**ranks, EXCLUDED: 0}


def test_peft_lora_refuses_rank_zero_so_a_pruned_projection_is_excluded(tiny_llama_dir):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    with pytest.raises(ValueError, match="positive integer"), quiet_peft():
        get_peft_model(load_base(tiny_llama_dir), PeftLoraConfig(r=4, target_modules=["v_proj"],
                                                                 rank_pattern={EXCLUDED: 0}))


def test_reader_gives_peft_ranks_scales_and_deltas(tiny_llama_dir, peft_adapter):
    adapter = read_adapter(peft_adapter)
    layers = _peft_layers(tiny_llama_dir, peft_adapter)
    assert {m.name for m in adapter.modules} == set(layers) and EXCLUDED not in layers
    assert len(layers) == 2 * 7 - 1
    for mod in adapter.modules:
        assert mod.rank == RANKS.get(mod.name, 4) == layers[mod.name].r["default"]
        assert mod.scale == pytest.approx(layers[mod.name].scaling["default"], rel=1e-12)
        np.testing.assert_allclose(mod.delta(), layers[mod.name].get_delta_weight("default").detach().numpy(),
                                   rtol=1e-5, atol=1e-7)


def test_reader_refuses_tensors_of_an_excluded_module(peft_adapter, tmp_path):
    import shutil

    shutil.copytree(peft_adapter, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["exclude_modules"] = [EXCLUDED, "model.layers.0.self_attn.o_proj"]   # but its tensors are there
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="exclude_modules .* PEFT would ignore it"):
        read_adapter(tmp_path)


def test_our_writer_loads_in_peft_with_equal_logits(tiny_llama_dir, peft_adapter, tmp_path):
    adapter = read_adapter(peft_adapter)
    state = {f"base_model.model.{m.name}.lora_{x}.weight": t for m in adapter.modules for x, t in (("A", m.a),
                                                                                                   ("B", m.b))}
    lora = LoraConfig(rank=4, alpha=8, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"))
    export_adapter(tmp_path, state, lora, str(tiny_llama_dir), rank_pattern=_rank_pattern(adapter))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["exclude_modules"] == [EXCLUDED] and EXCLUDED not in config["rank_pattern"]
    assert config["rank_pattern"]["model.layers.1.mlp.down_proj"] == 6
    layers = _peft_layers(tiny_llama_dir, tmp_path)
    assert {name: layer.r["default"] for name, layer in layers.items()} == {m.name: m.rank for m in adapter.modules}
    np.testing.assert_allclose(peft_logits(tiny_llama_dir, tmp_path), peft_logits(tiny_llama_dir, peft_adapter),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("pattern, message", [
    ({"model.layers.0.self_attn.q_proj": 2}, "rank 2 but its lora_A has 1 rows"),
    ({EXCLUDED: 0, "model.layers.0.self_attn.q_proj": 0}, "pruned to rank 0 is written without tensors"),
    ({"layers.0.q_proj": 1}, "not a module path"),
])
def test_writer_refuses_a_pattern_that_does_not_describe_the_state(tiny_llama_dir, peft_adapter, tmp_path,
                                                                  pattern, message):
    adapter = read_adapter(peft_adapter)
    state = {f"base_model.model.{m.name}.lora_{x}.weight": t for m in adapter.modules[:1] for x, t in (("A", m.a),
                                                                                                       ("B", m.b))}
    with pytest.raises(ValueError, match=message):
        export_adapter(tmp_path, state, LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj")), "base",
                       rank_pattern=pattern)


def test_model_card_lists_the_final_ranks_and_the_adaptive_settings(tiny_llama_dir, peft_adapter, tmp_path):
    adapter = read_adapter(peft_adapter)
    state = {f"base_model.model.{m.name}.lora_{x}.weight": t for m in adapter.modules for x, t in (("A", m.a),
                                                                                                   ("B", m.b))}
    lora = LoraConfig(rank=4, alpha=8)
    settings = AdaLoraSettings(init_r=4, target_r=3, tinit=2, tfinal=3, total_step=20)
    export_adapter(tmp_path, state, lora, "base", rank_pattern=_rank_pattern(adapter), adaptive=settings)
    card = (tmp_path / "README.md").read_text()
    assert "| layer | q_proj | k_proj | v_proj | o_proj | gate_proj | up_proj | down_proj |" in card
    assert "| 0 | 1 | 4 | 4 | 4 | 4 | 3 | 4 |" in card and "| 1 | 4 | 2 | 0 | 4 | 4 | 4 | 6 |" in card
    assert "Total rank 48 over 14 projections (average 3.43)" in card
    assert "adaptive rank (AdaLoRA" in card and "target_r 3" in card and "tinit 2" in card
    # The same ranks as a StepEvent.rank_map ([layer][target] in lora.targets order) give the same pattern.
    assert rank_pattern_of(((1, 4, 4, 4, 4, 3, 4), (4, 2, 0, 4, 4, 4, 6)), lora.targets) == _rank_pattern(adapter)
    plain = tmp_path / "plain"
    export_adapter(plain, state, lora, "base", rank_pattern=_rank_pattern(adapter))
    assert "| layer |" in (plain / "README.md").read_text() and "AdaLoRA" not in (plain / "README.md").read_text()


def test_merged_export_equals_peft(tiny_llama_dir, peft_adapter, tmp_path):
    import torch

    from engine.export.merged import export_merged

    result = export_merged(peft_adapter, tiny_llama_dir, tmp_path / "merged")
    assert result.n_merged == 13
    with torch.no_grad():
        got = load_base(result.path)(torch.tensor([PROBE_TOKENS])).logits[0].numpy()
    np.testing.assert_allclose(got, peft_logits(tiny_llama_dir, peft_adapter), rtol=0, atol=1e-4)


def test_gguf_holds_each_modules_rank_and_peft_delta(tiny_llama_dir, peft_adapter, tmp_path):
    import gguf

    from engine.export.gguf import export_gguf_adapter

    result = export_gguf_adapter(peft_adapter, tiny_llama_dir, tmp_path / "a.gguf", dtype="f32")
    reader = gguf.GGUFReader(result.path)
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    assert "blk.1.attn_v.weight.lora_a" not in tensors and len(tensors) == 2 * 13
    assert tensors["blk.0.attn_q.weight.lora_a"].shape == (1, 72)
    assert tensors["blk.1.ffn_down.weight.lora_b"].shape == (72, 6)
    assert tensors["blk.0.ffn_up.weight.lora_a"].shape == (3, 72)
    layers = _peft_layers(tiny_llama_dir, peft_adapter)
    for name, projection in (("blk.1.ffn_down", "model.layers.1.mlp.down_proj"),
                             ("blk.0.ffn_up", "model.layers.0.mlp.up_proj"),
                             ("blk.0.attn_v", "model.layers.0.self_attn.v_proj")):   # not permuted
        a, b = tensors[f"{name}.weight.lora_a"], tensors[f"{name}.weight.lora_b"]
        np.testing.assert_array_equal(a, layers[projection].lora_A["default"].weight.detach().numpy())
        np.testing.assert_allclose(alpha / a.shape[0] * (b @ a),   # what llama.cpp adds: alpha / r * B @ A
                                   layers[projection].get_delta_weight("default").detach().numpy(),
                                   rtol=1e-5, atol=1e-7)


def test_evaluation_computes_peft_logits(tiny_llama_dir, peft_adapter):
    from engine.backends.base import OptimizerConfig
    from engine.backends.choose import create_backend

    spec = load_model_spec(tiny_llama_dir)
    lora, state = inference_state(peft_adapter, spec)
    assert lora.rank == 6 and lora.scaling == 1.0
    backend = create_backend("cpu", tiny_llama_dir, lora, OptimizerConfig(), 1, len(PROBE_TOKENS),
                             init_state=state)[0]
    logits = backend.logits(np.array([PROBE_TOKENS], np.int32))
    np.testing.assert_allclose(np.asarray(logits).reshape(len(PROBE_TOKENS), -1),
                               peft_logits(tiny_llama_dir, peft_adapter), rtol=0, atol=1e-4)


def test_training_from_it_is_refused_by_name(tiny_llama_dir, peft_adapter):
    with pytest.raises(AdapterError, match="per-module ranks .* cannot be trained on"):
        import_adapter(peft_adapter, load_model_spec(tiny_llama_dir))


def test_chat_answers_with_peft_logits(tiny_llama_dir, peft_adapter):
    import torch

    from engine.chat.inference import ChatEngine

    chat = ChatEngine(device="cpu", dtype=torch.float32)
    chat.load(tiny_llama_dir)
    try:
        chat.set_active_adapter(chat.load_adapter(peft_adapter))
        text = "The quick brown fox"
        ids = chat.tokenizer(text, return_tensors="pt")["input_ids"][0].tolist()
        want = peft_logits(tiny_llama_dir, peft_adapter, ids)
        assert np.abs(want - peft_logits(tiny_llama_dir, None, ids)).max() > 0.1   # the adapter moves them
        np.testing.assert_allclose(chat.logits(text).numpy(), want, rtol=0, atol=1e-5)
    finally:
        chat.unload()


def test_evaluate_gives_peft_perplexity(tiny_llama_dir, peft_adapter, tmp_path):
    from pathlib import Path

    from peft import PeftModel

    from engine.train.evaluate import evaluate
    from engine.train.runs import eval_stream
    from tests.perplexity_reference import hf_guide_perplexity

    corpus = tmp_path / "eval.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. LoRA adds a low rank update.\n" * 4)
    ours = evaluate(str(tiny_llama_dir), [str(corpus)], adapter=str(peft_adapter), seq_len=24, stride=12,
                    backend="cpu")
    ids, labels = eval_stream([str(corpus)], Path(tiny_llama_dir))
    with quiet_peft():
        model = PeftModel.from_pretrained(load_base(tiny_llama_dir), peft_adapter).eval()
    want, tokens = hf_guide_perplexity(model, ids, labels, 24, 12)
    assert ours.tokens == tokens and ours.perplexity == pytest.approx(want, rel=1e-4)
