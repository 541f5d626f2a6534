"""The trainer on a real PyTorch+PEFT backend: learning, exact resume, pause/stop, and the non-finite guard."""
import threading

import numpy as np
import pytest
from safetensors.numpy import load_file

from engine.backends.base import MemoryOptions
from engine.backends.base import OptimizerConfig
from engine.train.checkpoint import checkpoint_root, list_checkpoints, load_checkpoint
from engine.lora.config import LoraConfig
from engine.model.spec import load_model_spec
from engine.train.config import TrainConfig
from engine.train.trainer import NonFiniteError, Trainer, TrainingError
from tests.torch_backend import torch_backend_factory
from tests.train_helpers import Recorder, pattern_batches, pattern_source

LORA = LoraConfig(rank=4, alpha=8)


def config(**kw):
    base = dict(lora=LORA, batch_size=2, seq_len=12, lr=1e-2, schedule="cosine", warmup_steps=1)
    return TrainConfig(**{**base, **kw})


def test_loss_falls_events_and_adapter(tiny_llama_dir, tmp_path):
    source = pattern_source(384, n_batches=3)
    rec = Recorder()
    trainer = Trainer(config(epochs=3, eval_every=2, save_every=4), torch_backend_factory(tiny_llama_dir), source,
                      tmp_path, base_model=str(tiny_llama_dir), val=pattern_batches(384, 1, 2, 12, seed=1),
                      callback=rec)
    summary = trainer.run()
    assert [e.step for e in rec.steps] == list(range(1, 10)) and summary.total_steps == 9
    assert rec.steps[0].lr == 0.0 and rec.steps[1].lr == pytest.approx(1e-2)   # warmup then cosine
    assert all(e.tokens == 20 and e.tokens_per_s > 0 and e.memory_bytes > 0 for e in rec.steps)
    assert [e.step for e in rec.evals] == [2, 4, 6, 8, 9] and rec.evals[-1].loss < rec.evals[0].loss
    assert rec.evals[-1].perplexity == pytest.approx(np.exp(rec.evals[-1].loss))
    assert [e.step for e in rec.checkpoints] == [4, 8, 9]
    assert [p.name for p in list_checkpoints(checkpoint_root(tmp_path))] == ["checkpoint-00000008",
                                                                             "checkpoint-00000009"]
    assert summary.final_loss < summary.first_loss - 0.5
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert set(saved) == set(summary.lora_state)
    assert all(np.array_equal(saved[k], summary.lora_state[k]) for k in saved)
    assert rec.finished == [summary] and not rec.failures
    assert "training loss" in (tmp_path / "README.md").read_text()


def run_to_end(model_dir, out, cfg, source, stop_at=None, resume=None):
    rec = Recorder()
    trainer = Trainer(cfg, torch_backend_factory(model_dir), source, out, base_model=str(model_dir),
                      callback=rec, resume=resume)
    if stop_at is not None:
        rec.on_step = lambda e: (rec.steps.append(e), e.step == stop_at and trainer.stop())
    return trainer.run(), rec


def test_interrupted_and_resumed_equals_uninterrupted(tiny_llama_dir, tmp_path):
    # 3 batches, accumulation 2 -> steps of 2 then 1 micro-batches; 7 steps cross epoch boundaries mid-way.
    cfg = config(grad_accum=2, max_steps=7, save_every=3, keep_checkpoints=3,
                 optim=OptimizerConfig(weight_decay=0.01))
    source = pattern_source(384, n_batches=3)
    full, _ = run_to_end(tiny_llama_dir, tmp_path / "full", cfg, source)
    spec = load_model_spec(tiny_llama_dir)

    stopped, rec = run_to_end(tiny_llama_dir, tmp_path / "cut", cfg, source, stop_at=4)
    assert stopped.stopped and stopped.steps == 5    # a step already in flight when stop() came finishes too
    resumed, rec2 = run_to_end(tiny_llama_dir, tmp_path / "cut", cfg, source,
                               resume=load_checkpoint(stopped.checkpoint, spec))
    assert [e.step for e in rec2.steps] == [6, 7] and not resumed.stopped
    # From the periodic checkpoint at step 3 of the uninterrupted run, in a fresh folder.
    periodic = load_checkpoint(tmp_path / "full" / "checkpoints" / "checkpoint-00000003", spec)
    again, _ = run_to_end(tiny_llama_dir, tmp_path / "full", cfg, source, resume=periodic)
    for key, value in full.lora_state.items():
        np.testing.assert_allclose(resumed.lora_state[key], value, atol=1e-6, rtol=0)
        np.testing.assert_allclose(again.lora_state[key], value, atol=1e-6, rtol=0)
    assert not np.array_equal(full.lora_state[key], periodic.lora_state[key])  # the tail did train


def test_resume_refuses_other_data_and_fresh_run_refuses_used_folder(tiny_llama_dir, tmp_path):
    cfg = config(max_steps=2)
    summary, _ = run_to_end(tiny_llama_dir, tmp_path, cfg, pattern_source(384))
    checkpoint = load_checkpoint(summary.checkpoint, load_model_spec(tiny_llama_dir))
    with pytest.raises(TrainingError, match="training data differs"):
        Trainer(cfg, torch_backend_factory(tiny_llama_dir), pattern_source(384, seed=5), tmp_path,
                base_model="m", resume=checkpoint)
    with pytest.raises(TrainingError, match="already holds checkpoints"):
        Trainer(cfg, torch_backend_factory(tiny_llama_dir), pattern_source(384), tmp_path, base_model="m")


def test_pause_holds_between_steps_and_resume_continues(tiny_llama_dir, tmp_path):
    rec = Recorder()
    trainer = Trainer(config(max_steps=4), torch_backend_factory(tiny_llama_dir), pattern_source(384), tmp_path,
                      base_model="m", callback=rec)
    seen_while_paused = []

    def on_step(event):
        rec.steps.append(event)
        if event.step == 1:
            trainer.pause()

    rec.on_step = on_step
    thread = threading.Thread(target=trainer.run)
    thread.start()
    for _ in range(600):
        if trainer.paused and len(rec.steps) == 2:
            break
        threading.Event().wait(0.05)
    threading.Event().wait(0.5)
    seen_while_paused.append(len(rec.steps))
    trainer.resume()
    thread.join(60)
    assert seen_while_paused == [2]      # step 2 was in flight when pause came; nothing after it ran
    assert [e.step for e in rec.steps] == [1, 2, 3, 4] and len(rec.finished) == 1


def _poisoned_model(model_dir, tmp_path, token):
    """A copy of a tiny untied model whose input embedding row `token` is inf: a sequence holding it has a NaN
    loss, others are unaffected (tied embeddings would poison every logit)."""
    import shutil

    from safetensors.numpy import save_file
    folder = tmp_path / "poisoned"
    shutil.copytree(model_dir, folder)
    weights = load_file(folder / "model.safetensors")
    weights["model.embed_tokens.weight"][token] = np.inf
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_non_finite_steps_are_skipped_reported_and_stop_the_run(tiny_model_dirs, tmp_path):
    good = pattern_batches(384, 2, 2, 12, seed=0)
    bad = [(ids.copy(), labels) for ids, labels in pattern_batches(384, 3, 2, 12, seed=2)]
    for ids, _ in bad:
        ids[0, 5] = 3      # the poisoned token
    from engine.train.data import ArrayBatches
    model = _poisoned_model(tiny_model_dirs["qwen2"], tmp_path, token=3)
    rec = Recorder()
    trainer = Trainer(config(max_steps=5, warmup_steps=0, save_every=1, keep_checkpoints=10),
                      torch_backend_factory(model), ArrayBatches(good + bad, shuffle=False), tmp_path / "out",
                      base_model="m", callback=rec)
    with pytest.raises(NonFiniteError, match=r"steps 3, 4, 5 in a row.*\(after step 1; step 2's update is dropped"):
        trainer.run()
    assert [e.skipped for e in rec.steps] == [False, False, True, True, True]
    assert not np.isfinite(rec.steps[2].loss)
    assert rec.failures and "steps 3, 4, 5" in rec.failures[0][1]
    # Kept: the adapter step 2 found finite (after step 1), written as the run's adapter; the bad state is no
    # checkpoint.
    kept = load_file(tmp_path / "out" / "adapter_model.safetensors")
    after_one = load_file(tmp_path / "out" / "checkpoints" / "checkpoint-00000001" / "adapter_model.safetensors")
    assert kept.keys() == after_one.keys() and all(np.array_equal(kept[k], after_one[k]) for k in kept)
    assert list_checkpoints(checkpoint_root(tmp_path / "out"))[-1].name == "checkpoint-00000004"   # none on stopping
    assert "after step 1" in (tmp_path / "out" / "README.md").read_text()


def test_non_finite_stop_runs_exactly_the_documented_count(tiny_model_dirs, tmp_path):
    """Results are read one step late; the stop still comes after max_nonfinite_in_a_row steps, not one more, and
    a run whose every step was non-finite writes no adapter."""
    from engine.train.data import ArrayBatches
    model = _poisoned_model(tiny_model_dirs["qwen2"], tmp_path, token=3)
    bad = [(ids.copy(), labels) for ids, labels in pattern_batches(384, 6, 2, 12, seed=2)]
    for ids, _ in bad:
        ids[0, 5] = 3
    rec = Recorder()
    trainer = Trainer(config(max_steps=6, warmup_steps=0, max_nonfinite_in_a_row=2),
                      torch_backend_factory(model), ArrayBatches(bad, shuffle=False), tmp_path / "out",
                      base_model="m", callback=rec)
    with pytest.raises(NonFiniteError, match=r"steps 1, 2 in a row.*no step was applied, so no adapter"):
        trainer.run()
    assert [e.step for e in rec.steps] == [1, 2]
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


@pytest.mark.gpu
def test_learning_rate_1e6_trips_the_guard_on_the_wgsl_backend(tiny_llama_dir, gpu_device, tmp_path):
    """Issue 5: lr 1e6 must trip the non-finite guard, and nothing non-finite is ever saved.

    The ~1e6 weights after step 1 overflow the residual stream; RMSNorm turns the overflowed mean square into
    NaN (PyTorch's, and ours before, gave 1/sqrt(inf) = 0 and a finite loss of exactly ln(vocab)), so the
    loss is NaN, the steps are skipped and the run stops after three in a row with the step-1 adapter."""
    from engine.backends.wgpu.backend import WgpuBackend

    def factory(lora, optim, batch_size, seq_len, seed=0, init_state=None, memory=MemoryOptions()):
        return WgpuBackend(tiny_llama_dir, lora, optim, batch_size, seq_len, ctx=gpu_device, lora_state=init_state,
                           seed=seed, weights=memory.weights, recompute=memory.recompute)

    rec = Recorder()
    trainer = Trainer(config(lr=1e6, max_steps=8, save_every=1, keep_checkpoints=10, warmup_steps=0),
                      factory, pattern_source(384), tmp_path, base_model=str(tiny_llama_dir), callback=rec)
    with pytest.raises(NonFiniteError, match=r"steps 2, 3, 4 in a row.*\(the adapter the run started from; step 1"):
        trainer.run()
    assert [e.skipped for e in rec.steps] == [False, True, True, True]
    assert np.isfinite(rec.steps[0].loss) and not any(np.isfinite(e.loss) for e in rec.steps[1:])
    assert rec.failures and "steps 2, 3, 4" in rec.failures[0][1]
    # Kept: the weights before step 1's update (the GPU optimizer's `previous` buffer), not step 1's ~1e6 ones
    # whose forward overflowed. B = 0 gives A no gradient, so A is unchanged by step 1.
    kept = load_file(tmp_path / "adapter_model.safetensors")
    step_one = load_file(checkpoint_root(tmp_path) / "checkpoint-00000001" / "adapter_model.safetensors")
    assert max(np.abs(v).max() for k, v in step_one.items() if ".lora_B." in k) > 1e5   # step 1 applied
    assert kept.keys() == step_one.keys()
    for key, value in kept.items():
        if ".lora_B." in key:
            assert not value.any()
        else:
            assert np.array_equal(value, step_one[key])


def test_recompute_is_validated_saved_and_handed_to_the_backend(tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match="recompute must be true or false, got 'yes'"):
        config(recompute="yes")
    assert TrainConfig.from_dict(config(recompute=True).to_dict()).recompute is True
    old = config().to_dict()
    del old["recompute"]                     # a checkpoint written before the setting existed
    assert TrainConfig.from_dict(old).recompute is False
    asked = []

    def factory(*args, memory=MemoryOptions(), **kw):
        asked.append(memory)
        return torch_backend_factory(tiny_llama_dir)(*args, **kw)

    Trainer(config(max_steps=1, recompute=True, weights="bf16"), factory, pattern_source(384), tmp_path,
            base_model="m").run()
    assert asked == [MemoryOptions(weights="bf16", recompute=True)]


def test_math_is_validated_saved_and_handed_to_the_backend(tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match="math 'f8' is unknown; choose from f32, f16"):
        config(math="f8")
    assert TrainConfig.from_dict(config(math="f16").to_dict()).math == "f16"
    old = config().to_dict()
    del old["math"]                          # a checkpoint written before the setting existed
    assert TrainConfig.from_dict(old).math == "f32"
    asked = []

    def factory(*args, memory=MemoryOptions(), **kw):
        asked.append(memory)
        return torch_backend_factory(tiny_llama_dir)(*args, **kw)

    Trainer(config(max_steps=1, recompute=False, weights="bf16", math="f16"), factory, pattern_source(384),
            tmp_path, base_model="m").run()
    assert asked == [MemoryOptions(weights="bf16", recompute=False, math="f16")]
