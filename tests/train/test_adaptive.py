"""AdaLoRA training (engine.train.adaptive over a backend) against PEFT's AdaLoraModel: the same initial adapter and
batches, torch AdamW, a schedule that crosses tinit and several budget steps into the final phase."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from engine.backends.base import OptimizerConfig
from engine.lora.adalora import AdaLoraSettings
from engine.lora.config import LoraConfig
from engine.model.spec import load_model_spec
from engine.train.adaptive import AdaptiveRankBackend, backend_lora
from tests.adalora_oracle import peft_adalora_model, peft_adalora_run, peft_tensors
from tests.oracle import random_batch

SETTINGS = AdaLoraSettings(init_r=4, target_r=2, tinit=2, tfinal=2, deltaT=1, total_step=8)
TARGETS = ("q_proj", "v_proj", "down_proj")
ALPHA = 8.0
LR, CLIP, DECAY = 2e-2, 1.0, 0.01


def _run_both(model_dir, make_backend, targets=TARGETS):
    spec = load_model_spec(model_dir)
    lora = backend_lora(LoraConfig(rank=SETTINGS.init_r, alpha=ALPHA, targets=targets), SETTINGS)
    optim = OptimizerConfig(weight_decay=DECAY)
    batches = [random_batch(spec.vocab_size, 2, 9, seed=s) for s in (40, 41, 42)]
    ours = AdaptiveRankBackend(make_backend(model_dir, lora, optim), SETTINGS, optim, seed=5)
    start = ours.params.peft_tensors()
    with ours:
        results = [ours.train_step([batches[i % 3]], LR, CLIP).result() for i in range(SETTINGS.total_step)]
        final = ours.params.peft_tensors()
    model = peft_adalora_model(model_dir, SETTINGS, ALPHA, targets, start)
    losses, patterns = peft_adalora_run(model, batches, LR, SETTINGS.total_step, ours.modules, CLIP, DECAY)
    return results, final, losses, patterns, peft_tensors(model)


def _check(results, final, losses, patterns, theirs):
    assert not any(r.skipped for r in results)
    np.testing.assert_allclose([r.loss for r in results], losses, rtol=1e-3)
    ranks = []
    for step, (result, pattern) in enumerate(zip(results, patterns), start=1):
        expected = SETTINGS.init_r * np.ones(len(pattern) if pattern is not None else 0, int)
        if pattern is None:
            assert step <= SETTINGS.tinit
            assert all(r == SETTINGS.init_r for row in result.rank_map for r in row)
        else:
            expected = pattern.sum(axis=1)
            assert np.array_equal(np.array(result.rank_map).ravel(), expected), f"step {step}"
        ranks.append(int(np.sum(expected)))
    # The budget really moved: full through tinit, falling, then the target total from total_step - tfinal.
    assert ranks[SETTINGS.tinit] < len(patterns[-1]) * SETTINGS.init_r
    assert ranks[-1] == ranks[-2] == ranks[-3] == len(patterns[-1]) * SETTINGS.target_r
    assert final.keys() == theirs.keys()
    for key, value in theirs.items():
        np.testing.assert_allclose(final[key], value, rtol=1e-3, atol=1e-3 * float(np.abs(value).max()),
                                   err_msg=key)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_cpu_backend_matches_peft_adalora(tiny_model_dirs, arch):
    from engine.backends.onnx import OnnxBackend

    def make(model_dir, lora, optim):
        return OnnxBackend(model_dir, lora, optim, 2, 9, threads=1)

    _check(*_run_both(tiny_model_dirs[arch], make))


def test_cpu_backend_matches_peft_adalora_on_phi3s_fused_projections(tiny_phi3_dir):
    """PEFT's AdaLoRA on qkv_proj and gate_up_proj: one P·Λ·Q per fused module, its triplets ranked as one."""
    from engine.backends.onnx import OnnxBackend

    def make(model_dir, lora, optim):
        return OnnxBackend(model_dir, lora, optim, 2, 9, threads=1)

    _check(*_run_both(tiny_phi3_dir, make, targets=("qkv_proj", "o_proj", "gate_up_proj")))


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_wgsl_backend_matches_peft_adalora(tiny_model_dirs, arch, gpu_device):
    from engine.backends.wgpu.backend import WgpuBackend

    def make(model_dir, lora, optim):
        return WgpuBackend(model_dir, lora, optim, 2, 9, ctx=gpu_device)

    _check(*_run_both(tiny_model_dirs[arch], make))


# -- the trainer's AdaLoRA run: events, adapters, resume -------------------------------------------------------------

def _cpu_factory(model_dir):
    from engine.backends.onnx import OnnxBackend

    def factory(lora, optim, batch_size, seq_len, seed=0, init_state=None, memory=None):
        return OnnxBackend(model_dir, lora, optim, batch_size, seq_len, seed=seed, init_state=init_state, threads=1)
    return factory


def _config(**kw):
    from engine.train.config import TrainConfig

    base = {"lora": LoraConfig(rank=SETTINGS.init_r, alpha=ALPHA, targets=TARGETS), "batch_size": 2, "seq_len": 9,
            "lr": LR, "schedule": "constant", "max_grad_norm": CLIP, "optim": OptimizerConfig(weight_decay=DECAY),
            "max_steps": SETTINGS.total_step, "adaptive_rank": replace(SETTINGS, total_step=0), "seed": 3}
    return TrainConfig(**{**base, **kw})


def _trainer(model_dir, out, cfg, batches, resume=None, stop_at=None):
    from engine.train.data import ArrayBatches
    from engine.train.trainer import Trainer
    from tests.train_helpers import Recorder

    rec = Recorder()
    trainer = Trainer(cfg, _cpu_factory(model_dir), ArrayBatches(batches, shuffle=False), out,
                      base_model=str(model_dir), callback=rec, resume=resume)
    if stop_at is not None:
        rec.on_step = lambda e: (rec.steps.append(e), e.step == stop_at and trainer.stop())
    return trainer, rec


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids.astype(np.int64))).logits.numpy()


def test_trainer_run_matches_peft_and_writes_adapters_peft_loads(tiny_llama_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from engine.lora.adalora import init_adalora_params

    spec = load_model_spec(tiny_llama_dir)
    batches = [random_batch(spec.vocab_size, 2, 9, seed=s) for s in (50, 51, 52)]
    trainer, rec = _trainer(tiny_llama_dir, tmp_path / "run", _config(), batches)
    summary = trainer.run()
    assert trainer.config.adaptive_rank.total_step == SETTINGS.total_step     # 0: the run's length
    start = init_adalora_params(spec, TARGETS, SETTINGS.init_r, seed=3)
    model = peft_adalora_model(tiny_llama_dir, SETTINGS, ALPHA, TARGETS, start.peft_tensors())
    losses, patterns = peft_adalora_run(model, batches, LR, SETTINGS.total_step, start.modules, CLIP, DECAY)
    np.testing.assert_allclose([e.loss for e in rec.steps], losses, rtol=1e-3)
    assert [tuple(np.ravel(e.rank_map)) for e in rec.steps[SETTINGS.tinit:]] == \
        [tuple(p.sum(axis=1)) for p in patterns[SETTINGS.tinit:]]
    assert summary.losses == [e.loss for e in rec.steps]

    # The AdaLoRA adapter: PEFT loads it (truncated by its rank_pattern) and computes what the run's backend does.
    ids = batches[0][0]
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, attn_implementation="eager")
    loaded = PeftModel.from_pretrained(base, tmp_path / "run").eval()
    assert loaded.peft_config["default"].peft_type == "ADALORA"
    ours = _logits(loaded, ids)
    with _cpu_factory(tiny_llama_dir)(backend_lora(_config().lora, SETTINGS), OptimizerConfig(), 2, 9,
                                      init_state=summary.lora_state) as backend:
        np.testing.assert_allclose(ours, backend.logits(ids), rtol=1e-4, atol=1e-4)
    # ... and its files are what PEFT's save_pretrained writes for the same triplets and pattern.
    model.save_pretrained(tmp_path / "peft")
    _same_files_as_peft(tmp_path / "run", tmp_path / "peft", patterns[-1])
    # The folded per-module-rank LoRA gives PEFT the same logits.
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, attn_implementation="eager")
    folded = PeftModel.from_pretrained(base, tmp_path / "run" / "lora-rank-pattern").eval()
    assert folded.peft_config["default"].peft_type == "LORA"
    np.testing.assert_allclose(_logits(folded, ids), ours, rtol=1e-4, atol=1e-4)
    card = (tmp_path / "run" / "README.md").read_text()
    assert "## Final ranks" in card and "model.layers.1.mlp.down_proj: " in card


def _same_files_as_peft(ours, theirs, pattern):
    import json

    from safetensors.numpy import load_file

    a, b = (json.loads((d / "adapter_config.json").read_text()) for d in (ours, theirs))
    for d in (a, b):
        d["target_modules"] = sorted(d["target_modules"])
        d.pop("base_model_name_or_path")
    assert a == b
    t_ours, t_theirs = load_file(ours / "adapter_model.safetensors"), load_file(theirs / "adapter_model.safetensors")
    assert {k: v.shape for k, v in t_ours.items()} == {k: v.shape for k, v in t_theirs.items()}
    assert sum(v.shape[0] for k, v in t_ours.items() if k.endswith("lora_E")) == int(pattern.sum())


def test_resume_mid_schedule_equals_an_uninterrupted_run(tiny_llama_dir, tmp_path):
    from engine.train.checkpoint import load_checkpoint

    spec = load_model_spec(tiny_llama_dir)
    batches = [random_batch(spec.vocab_size, 2, 9, seed=s) for s in (60, 61, 62)]
    cfg = _config(save_every=3, keep_checkpoints=5)
    full_trainer, full = _trainer(tiny_llama_dir, tmp_path / "full", cfg, batches)
    full_trainer.run()
    expected = full_trainer.backend.params.flat.copy()
    cut_trainer, _ = _trainer(tiny_llama_dir, tmp_path / "cut", cfg, batches, stop_at=4)
    stopped = cut_trainer.run()
    assert stopped.stopped and stopped.steps in (4, 5)     # a step in flight when stop() came finishes too
    # Step 4 is inside the budget phase (tinit 2, total 8, tfinal 2): EMAs and the pattern must come back.
    resumed_trainer, resumed = _trainer(tiny_llama_dir, tmp_path / "cut", cfg, batches,
                                        resume=load_checkpoint(stopped.checkpoint, spec))
    resumed_trainer.run()
    np.testing.assert_allclose(resumed_trainer.backend.params.flat, expected, rtol=0, atol=1e-6)
    assert [e.rank_map for e in resumed.steps] == [e.rank_map for e in full.steps[stopped.steps:]]
    np.testing.assert_allclose([e.loss for e in resumed.steps], [e.loss for e in full.steps[stopped.steps:]],
                               rtol=1e-6)


def test_adaptive_rank_refuses_what_it_does_not_compute():
    with pytest.raises(ValueError, match="adaptive rank.*objective dpo"):
        _config(objective="dpo")
    with pytest.raises(ValueError, match="adaptive rank.*dropout 0.1"):
        _config(lora=LoraConfig(rank=SETTINGS.init_r, alpha=ALPHA, dropout=0.1))
    with pytest.raises(ValueError, match="adaptive rank.*rsLoRA"):
        _config(lora=LoraConfig(rank=SETTINGS.init_r, alpha=ALPHA, use_rslora=True))
    with pytest.raises(ValueError, match="LoRA rank 16 differs from init_r 4"):
        _config(lora=LoraConfig(rank=16))


def test_non_finite_steps_keep_the_last_good_adalora_adapter(tiny_model_dirs, tmp_path):
    """Poisoned tokens from step 3 on: steps 3-5 are skipped (the allocator untouched), the run stops, and the
    AdaLoRA adapter written is the one from before step 2's update (after step 1), as for plain LoRA."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from engine.lora.adalora import AdaLoraParams, adalora_modules
    from engine.train.checkpoint import load_checkpoint
    from engine.train.trainer import NonFiniteError

    folder = tmp_path / "poisoned"
    shutil.copytree(tiny_model_dirs["qwen2"], folder)
    weights = load_file(folder / "model.safetensors")
    weights["model.embed_tokens.weight"][3] = np.inf
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    spec = load_model_spec(folder)
    batches = [random_batch(spec.vocab_size, 2, 9, seed=s) for s in range(70, 75)]
    for ids, _ in batches[2:]:
        ids[0, 4] = 3
    cfg = _config(max_steps=5, save_every=1, keep_checkpoints=10,
                  adaptive_rank=AdaLoraSettings(init_r=4, target_r=2, tinit=1, tfinal=1, total_step=5))
    trainer, rec = _trainer(folder, tmp_path / "out", cfg, batches)
    with pytest.raises(NonFiniteError, match=r"steps 3, 4, 5 in a row.*after step 1"):
        trainer.run()
    assert [e.skipped for e in rec.steps] == [False, False, True, True, True]
    assert rec.steps[-1].rank_map == rec.steps[1].rank_map       # skipped steps allocate nothing
    after_one = load_checkpoint(tmp_path / "out" / "checkpoints" / "checkpoint-00000001", spec)
    params = AdaLoraParams(adalora_modules(spec, TARGETS), 4, after_one.optimizer_state["adalora.params"])
    kept = trainer.backend.kept()
    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    for i, m in enumerate(params.modules):
        prefix = f"base_model.model.model.layers.{m.layer}.{'self_attn' if m.target != 'down_proj' else 'mlp'}"
        np.testing.assert_array_equal(saved[f"{prefix}.{m.target}.lora_A"], params.A[i][kept[i]])
        np.testing.assert_array_equal(saved[f"{prefix}.{m.target}.lora_B"], params.B[i][:, kept[i]])
